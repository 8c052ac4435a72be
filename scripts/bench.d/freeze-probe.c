/* The kernel's own freeze cost, without any agent: runs inside the lab guest, freezes the
 * given mountpoints with FIFREEZE one after the other, thaws them at once with FITHAW, and
 * prints one line per repetition: "<freeze_ms> <thaw_ms>". With stall-writer running on
 * one of them, the writer's gaps show how long a freeze blocks writers with a zero window.
 *
 *   freeze-probe <repetitions> <gap_ms> <mountpoint>...
 */
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
    int reps = atoi(argv[1]), gap_ms = atoi(argv[2]), n = argc - 3;
    int fds[64];
    if (n > 64) {
        fprintf(stderr, "freeze-probe: at most 64 mountpoints\n");
        return 2;
    }
    for (int i = 0; i < n; i++) {
        fds[i] = open(argv[3 + i], O_RDONLY | O_DIRECTORY);
        if (fds[i] < 0) {
            perror(argv[3 + i]);
            return 1;
        }
    }
    for (int r = 0; r < reps; r++) {
        usleep(gap_ms * 1000);
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
        for (int i = 0; i < frozen; i++)
            if (ioctl(fds[i], FITHAW, 0) != 0) {
                perror("FITHAW");
                failed = 1;
            }
        double t2 = now_ms();
        if (failed)
            return 1;
        printf("%.3f %.3f\n", t1 - t0, t2 - t1);
    }
    return 0;
}
