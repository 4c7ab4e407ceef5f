/* Compiled into sshpump's patched libssh2 (csrc/build_libssh2.py) and nowhere
 * else: a process can tell that the libssh2 it has mapped is the patched one
 * by looking this symbol up, and sshpump --version prints it. */
__attribute__((__visibility__("default")))
const char sshpump_libssh2_build[] =
    "libssh2 1.11.1 + sshpump whole-packet-crypt patch";
