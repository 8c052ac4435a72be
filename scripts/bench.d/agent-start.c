/* Time from starting qemu-ga to its first answered command, on the guest's own clock: runs
 * inside the lab guest, starts a private qemu-ga listening on a Unix socket, connects as
 * soon as the socket accepts and sends guest-ping until one is answered. Prints that time
 * in ms, then stops the agent. One line per repetition.
 *
 *   agent-start <repetitions> <socket> <qemu-ga> [qemu-ga arguments...]
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* 1 when the agent at `path` answered a guest-ping within a second, else 0. */
static int ping(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    struct timeval limit = {.tv_sec = 1};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    const char *request = "{\"execute\":\"guest-ping\"}\n";
    char reply[256] = {0};
    int answered = write(fd, request, strlen(request)) == (ssize_t)strlen(request) &&
                   read(fd, reply, sizeof reply - 1) > 0 && strstr(reply, "\"return\"");
    close(fd);
    return answered;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: agent-start <repetitions> <socket> <qemu-ga> [arguments...]\n");
        return 2;
    }
    int reps = atoi(argv[1]);
    const char *path = argv[2];
    for (int r = 0; r < reps; r++) {
        unlink(path);
        double t0 = now_ms();
        pid_t pid = fork();
        if (pid == 0) {
            execv(argv[3], argv + 3);
            _exit(127);
        }
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        int answered = 0;
        while (!answered && now_ms() - t0 < 30000) {
            int status;
            if (waitpid(pid, &status, WNOHANG) == pid) {
                fprintf(stderr, "agent-start: qemu-ga exited early\n");
                return 1;
            }
            answered = ping(path);
            if (!answered)
                usleep(1000);
        }
        double t1 = now_ms();
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
        if (!answered) {
            fprintf(stderr, "agent-start: no answer within 30 s\n");
            return 1;
        }
        printf("%.3f\n", t1 - t0);
    }
    return 0;
}
