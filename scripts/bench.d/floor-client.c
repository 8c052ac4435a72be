/* The freeze window's floor inside the OpenZFS lab guest, where the pool is: on one agent
 * connection opened and synced before, guest-fsfreeze-freeze-list, then `zfs snapshot`
 * (fork + exec of the given argv), then guest-fsfreeze-thaw, back to back. Prints
 * "<freeze_ms> <snapshot_ms> <thaw_ms> <window_ms>", the window being the freeze's reply to
 * the thaw's reply (as the orchestrator's freeze_window_ms).
 *
 *   floor-client vsock:CID:PORT '<mountpoints as a JSON array>' zfs snapshot a@n b@n
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <linux/vm_sockets.h>

static char buf[1 << 16];
static size_t len;
static int fd;

static void die(const char *what) { perror(what); exit(1); }

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* The next non-empty reply line (0xFF delimiters skipped); exits on EOF. */
static char *reply(const char *to) {
    static size_t start;
    for (;;) {
        if (start) { memmove(buf, buf + start, len - start); len -= start; start = 0; }
        char *nl = memchr(buf, '\n', len);
        if (nl) {
            *nl = 0;
            start = nl - buf + 1;
            char *line = buf;
            while (*line == (char)0xff) line++;
            if (*line) return line;
            continue;
        }
        if (len == sizeof buf) { fprintf(stderr, "floor-client: reply too long\n"); exit(1); }
        ssize_t n = read(fd, buf + len, sizeof buf - len);
        if (n <= 0) { fprintf(stderr, "floor-client: no reply to %s\n", to); exit(1); }
        len += n;
    }
}

static void command(const char *json, const char *name) {
    size_t n = strlen(json);
    for (const char *s = json; n;) {
        ssize_t w = write(fd, s, n);
        if (w < 0) die("floor-client: write");
        s += w;
        n -= w;
    }
    char *line = reply(name);
    if (!strstr(line, "\"return\"")) { fprintf(stderr, "floor-client: %s: %s\n", name, line); exit(1); }
}

int main(int argc, char **argv) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK};
    if (argc < 4 || strncmp(argv[1], "vsock:", 6) || sscanf(argv[1] + 6, "%u:%u", &a.svm_cid, &a.svm_port) != 2) {
        fprintf(stderr, "usage: floor-client vsock:CID:PORT '<mountpoints JSON>' ZFS-ARGV...\n");
        return 2;
    }
    if ((fd = socket(AF_VSOCK, SOCK_STREAM, 0)) < 0) die("floor-client: socket");
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) die("floor-client: connect");
    struct timeval tv = {.tv_sec = 60};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    /* The 0xFF resets the agent's parser (it answers it with a parse error first). */
    const char *sync = "\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":4242}}\n";
    if (write(fd, sync, strlen(sync)) < 0) die("floor-client: write");
    while (!strstr(reply("guest-sync-delimited"), "4242")) {}
    static char freeze[8192];
    snprintf(freeze, sizeof freeze,
             "{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{\"mountpoints\":%s}}\n", argv[2]);
    double tf = now_ms();
    command(freeze, "guest-fsfreeze-freeze-list");
    double t0 = now_ms();
    pid_t pid = fork();
    if (pid == 0) { execvp(argv[3], argv + 3); _exit(127); }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) < 0) die("floor-client: zfs");
    double ts = now_ms();
    command("{\"execute\":\"guest-fsfreeze-thaw\"}\n", "guest-fsfreeze-thaw");
    double t1 = now_ms();
    if (!WIFEXITED(status) || WEXITSTATUS(status)) { fprintf(stderr, "floor-client: zfs failed\n"); return 1; }
    printf("%.3f %.3f %.3f %.3f\n", t0 - tf, ts - t0, t1 - ts, t1 - t0);
    return 0;
}
