/* qga-client: a tiny QEMU guest agent client for inside the OpenZFS lab guest (busybox has no
 * AF_VSOCK client). Built static by scripts/lib/lab/openzfs.py into the guest's /usr/bin.
 *
 *   qga-client vsock:CID:PORT|unix:PATH [JSON-COMMAND...]
 *
 * Connects, does the 0xFF + guest-sync-delimited handshake the real agent needs (docs/lab.md,
 * "The agent on the wire"), sends each argument as one command and prints each reply on its
 * own line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <linux/vm_sockets.h>

static char buf[1 << 20];
static size_t len;
static int fd;

static void die(const char *what) { perror(what); exit(1); }

/* Next line (without '\n' and leading 0xFF bytes), or NULL at EOF. */
static char *next_line(void) {
  static size_t start;
  if (start) { memmove(buf, buf + start, len - start); len -= start; start = 0; }
  for (;;) {
    char *nl = memchr(buf, '\n', len);
    if (nl) {
      *nl = 0;
      start = nl - buf + 1;
      char *line = buf;
      while (*line == (char)0xff) line++;
      return line;
    }
    if (len == sizeof buf) { fprintf(stderr, "qga-client: reply too long\n"); exit(1); }
    ssize_t n = read(fd, buf + len, sizeof buf - len);
    if (n < 0) die("qga-client: read");
    if (n == 0) return NULL;
    len += n;
  }
}

static void send_all(const char *s, size_t n) {
  while (n) { ssize_t w = write(fd, s, n); if (w < 0) die("qga-client: write"); s += w; n -= w; }
}

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: qga-client vsock:CID:PORT|unix:PATH [JSON-COMMAND...]\n"); return 2; }
  if (!strncmp(argv[1], "vsock:", 6)) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK};
    if (sscanf(argv[1] + 6, "%u:%u", &a.svm_cid, &a.svm_port) != 2) { fprintf(stderr, "qga-client: bad address\n"); return 2; }
    if ((fd = socket(AF_VSOCK, SOCK_STREAM, 0)) < 0) die("qga-client: socket(AF_VSOCK)");
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) die("qga-client: connect");
  } else if (!strncmp(argv[1], "unix:", 5)) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1] + 5, sizeof a.sun_path - 1);
    if ((fd = socket(AF_UNIX, SOCK_STREAM, 0)) < 0) die("qga-client: socket(AF_UNIX)");
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) die("qga-client: connect");
  } else { fprintf(stderr, "qga-client: bad address\n"); return 2; }
  struct timeval tv = {.tv_sec = 30};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char cmd[128], want[64];
  int id = (int)(getpid() * 7919u % 1000000000u) + 1;
  int n = snprintf(cmd, sizeof cmd, "\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":%d}}\n", id);
  snprintf(want, sizeof want, "{\"return\":%d}", id);
  send_all(cmd, n);
  for (;;) {
    char *line = next_line();
    if (!line) { fprintf(stderr, "qga-client: no reply to guest-sync-delimited\n"); return 1; }
    char *o = line, *i = line;
    for (; *i; i++) if (*i != ' ') *o++ = *i;
    *o = 0;
    if (!strcmp(line, want)) break;
  }
  for (int k = 2; k < argc; k++) {
    send_all(argv[k], strlen(argv[k]));
    send_all("\n", 1);
    char *line;
    do { line = next_line(); } while (line && !*line);
    if (!line) { fprintf(stderr, "qga-client: no reply to %s\n", argv[k]); return 1; }
    puts(line);
    fflush(stdout);
  }
  return 0;
}
