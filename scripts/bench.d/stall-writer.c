/* The guest-visible stall: runs inside the lab guest, appends a small record to a file on a
 * volume as fast as it can, and logs every gap between two completed writes longer than a
 * threshold as "<start_unix_us> <gap_us>" lines to a log outside the volumes. A freeze
 * blocks write() on the frozen filesystem, so each freeze shows as one long gap.
 *
 *   stall-writer <file> <log> <seconds> <threshold_us>
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_us(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: stall-writer <file> <log> <seconds> <threshold_us>\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    FILE *log = fopen(argv[2], "w");
    if (fd < 0 || !log) {
        perror("open");
        return 1;
    }
    long long end = now_us(CLOCK_MONOTONIC) + atoll(argv[3]) * 1000000LL;
    long long threshold = atoll(argv[4]);
    char record[64];
    long long last = now_us(CLOCK_MONOTONIC), writes = 0, longest = 0;
    while (last < end) {
        int n = snprintf(record, sizeof record, "%lld\n", writes);
        if (write(fd, record, n) != n) {
            perror("write");
            return 1;
        }
        if (++writes % 4096 == 0)
            lseek(fd, 0, SEEK_SET); /* keep the file small */
        long long t = now_us(CLOCK_MONOTONIC);
        long long gap = t - last;
        if (gap > longest)
            longest = gap;
        if (gap > threshold) {
            long long wall = now_us(CLOCK_REALTIME) - gap;
            fprintf(log, "%lld %lld\n", wall, gap);
            fflush(log);
        }
        last = t;
    }
    fprintf(log, "# writes %lld longest_us %lld\n", writes, longest);
    fclose(log);
    return 0;
}
