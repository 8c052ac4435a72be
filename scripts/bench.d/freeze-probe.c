/* The kernel's own freeze cost, without any agent: runs inside the lab guest, freezes the
 * given mountpoints with FIFREEZE one after the other, thaws them at once with FITHAW in the
 * opposite order (as qemu-ga does: the first frozen is the last thawed), and prints one
 * line per repetition: "<freeze_ms> <thaw_ms> <sync_ms>". With stall-writer running on the
 * first one, the writer's gaps show how long a freeze blocks the worst-off writer with a
 * zero window. With -s, each repetition first flushes them all (syncfs, timed apart as
 * sync_ms, writers not blocked), as snap-orchestrate's freeze.flush_first does.
 *
 *   freeze-probe <repetitions> <gap_ms> [-s] <mountpoint>...
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: freeze-probe <repetitions> <gap_ms> <mountpoint>...\n");
        return 2;
    }
    int reps = atoi(argv[1]), gap_ms = atoi(argv[2]), first = 3;
    int sync_first = argc > 3 && argv[3][0] == '-' && argv[3][1] == 's' && !argv[3][2];
    if (sync_first)
        first = 4;
    int n = argc - first;
    int fds[64];
    if (n < 1 || n > 64) {
        fprintf(stderr, "freeze-probe: 1 to 64 mountpoints\n");
        return 2;
    }
    for (int i = 0; i < n; i++) {
        fds[i] = open(argv[first + i], O_RDONLY | O_DIRECTORY);
        if (fds[i] < 0) {
            perror(argv[first + i]);
            return 1;
        }
    }
    for (int r = 0; r < reps; r++) {
        usleep(gap_ms * 1000);
        double ts = now_ms();
        if (sync_first)
            for (int i = 0; i < n; i++)
                if (syncfs(fds[i]) != 0)
                    perror("syncfs");
        double t0 = now_ms();
        int frozen = 0, failed = 0;
        for (; frozen < n; frozen++)
            if (ioctl(fds[frozen], FIFREEZE, 0) != 0) {
                perror("FIFREEZE");
                failed = 1;
                break;
            }
        double t1 = now_ms();
        /* Always thaw what was frozen, failure or not. */
        for (int i = frozen - 1; i >= 0; i--)
            if (ioctl(fds[i], FITHAW, 0) != 0) {
                perror("FITHAW");
                failed = 1;
            }
        double t2 = now_ms();
        if (failed)
            return 1;
        printf("%.3f %.3f %.3f\n", t1 - t0, t2 - t1, t0 - ts);
    }
    return 0;
}
