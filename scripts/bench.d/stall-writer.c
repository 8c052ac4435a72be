/* The guest-visible stall: runs inside the lab guest, writes to a file on a volume and logs
 * every write() call that took longer than a threshold as "<start_unix_us> <duration_us>"
 * lines to a log outside the volumes. A freeze blocks write() on the frozen filesystem, so
 * each freeze shows as one long call.
 *
 *   stall-writer <file> <log> <seconds> <threshold_us> [<record_bytes> <bytes_per_s> <file_bytes>]
 *
 * Without the last three: small records (a counter line) as fast as it can, in a file kept
 * small. With them: records of <record_bytes>, paced to <bytes_per_s> (0: unpaced),
 * overwriting a file of <file_bytes> round and round, so that up to <file_bytes> of the
 * page cache is dirty when a freeze comes and the freeze has that much to write out.
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
    if (argc != 5 && argc != 8) {
        fprintf(stderr, "usage: stall-writer <file> <log> <seconds> <threshold_us> "
                        "[<record_bytes> <bytes_per_s> <file_bytes>]\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    FILE *log = fopen(argv[2], "w");
    if (fd < 0 || !log) {
        perror("open");
        return 1;
    }
    long long start = now_us(CLOCK_MONOTONIC);
    long long end = start + atoll(argv[3]) * 1000000LL;
    long long threshold = atoll(argv[4]);
    long long record_bytes = argc == 8 ? atoll(argv[5]) : 0;
    long long rate = argc == 8 ? atoll(argv[6]) : 0;
    long long file_bytes = argc == 8 ? atoll(argv[7]) : 0;
    if (argc == 8 && (record_bytes <= 0 || record_bytes > (1 << 24) || file_bytes < record_bytes || rate < 0)) {
        fprintf(stderr, "stall-writer: bad record, rate or file size\n");
        return 2;
    }
    char *buf = malloc(record_bytes > 64 ? record_bytes : 64);
    if (!buf) {
        perror("malloc");
        return 1;
    }
    memset(buf, 'x', record_bytes > 64 ? record_bytes : 64);
    long long writes = 0, longest = 0, written = 0, offset = 0;
    for (long long t = start; t < end; t = now_us(CLOCK_MONOTONIC)) {
        int n;
        if (record_bytes) {
            n = (int)record_bytes;
            /* Paced: wait until the bytes written so far are due. */
            if (rate) {
                long long due = start + written * 1000000LL / rate;
                if (due > t)
                    usleep((useconds_t)(due - t));
            }
            if (offset + n > file_bytes) {
                lseek(fd, 0, SEEK_SET);
                offset = 0;
            }
        } else {
            n = snprintf(buf, 64, "%lld\n", writes);
            if (writes % 4096 == 0)
                lseek(fd, 0, SEEK_SET); /* keep the file small */
        }
        long long before = now_us(CLOCK_MONOTONIC);
        if (write(fd, buf, n) != n) {
            perror("write");
            return 1;
        }
        long long took = now_us(CLOCK_MONOTONIC) - before;
        writes++;
        written += n;
        offset += n;
        if (took > longest)
            longest = took;
        if (took > threshold) {
            long long wall = now_us(CLOCK_REALTIME) - took;
            fprintf(log, "%lld %lld\n", wall, took);
            fflush(log);
        }
    }
    fprintf(log, "# writes %lld bytes %lld longest_us %lld\n", writes, written, longest);
    fclose(log);
    return 0;
}
