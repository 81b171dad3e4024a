/*
 * pmi2_allgather VALUE: every task of a Slurm step started with --mpi=pmi2 publishes VALUE through
 * PMI2 and reads back every task's, then prints one line:
 *     rank R/N on HOST: VALUE_0 VALUE_1 ... VALUE_N-1
 * Every task printing all N values shows that the tasks exchanged data through PMI, across nodes.
 * It is what an MPI library does at start-up (publish its address, fence, read its peers'), with
 * nothing but libc, so the same static binary runs on the host or inside any container image.
 *
 * The PMI2 wire protocol, as Slurm's mpi/pmi2 plugin speaks it (slurmstepd is the server):
 *  - Slurm gives each task a connected socket (its number in PMI_FD) plus PMI_RANK, PMI_SIZE
 *    and PMI_JOBID.
 *  - Handshake, in the older PMI-1 text form (space-separated key=value, ending in a newline):
 *    the task sends "cmd=init pmi_version=2 pmi_subversion=0\n" and the server answers
 *    "cmd=response_to_init rc=0 pmi_version=2 pmi_subversion=0\n". The server takes the handshake
 *    in a single read, so nothing else may be sent before its answer arrives.
 *  - After it, every message either way is a 6-character length (decimal, left-aligned, padded
 *    with spaces) followed by that many bytes of "cmd=NAME;key=value;...;": each pair ends in ';'
 *    and values cannot contain ';' (Slurm does not unescape them). Answers are "NAME-response"
 *    with rc=0 on success.
 *  - fullinit (pmijobid, pmirank, threaded): answer carries rank and size;
 *    kvs-put (key, value): stored by the node's slurmstepd until the next fence;
 *    kvs-fence: answered once every task of the step has fenced, after the slurmstepds have sent
 *    their puts up a tree to srun and received everything back, so that
 *    kvs-get (key): answers found=TRUE and the value of any task's put;
 *    finalize: the server answers and closes the socket.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_MSG 2048

static int pmi_fd = -1;

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("pmi2_allgather: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static void write_all(const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(pmi_fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die("write to PMI_FD: %s", strerror(errno));
		buf += n;
		len -= (size_t)n;
	}
}

static void read_all(char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = read(pmi_fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die("read from PMI_FD: %s", n == 0 ? "closed" : strerror(errno));
		buf += n;
		len -= (size_t)n;
	}
}

/* The handshake's answer: one line. */
static void read_line(char *buf, size_t size)
{
	size_t used = 0;
	while (used + 1 < size) {
		read_all(buf + used, 1);
		if (buf[used++] == '\n')
			break;
	}
	buf[used] = '\0';
}

/* Send one PMI2 command ("cmd=...;...;") and return its answer in reply (NUL-terminated). */
static void command(const char *cmd, char *reply, const char *expect)
{
	char head[7], len_buf[7];
	size_t len = strlen(cmd);
	if (len > 999999)
		die("command too long");
	snprintf(head, sizeof head, "%-6zu", len);
	write_all(head, 6);
	write_all(cmd, len);
	read_all(len_buf, 6);
	len_buf[6] = '\0';
	len = (size_t)atoi(len_buf);
	if (len == 0 || len >= MAX_MSG)
		die("bad answer length '%s' to %s", len_buf, cmd);
	read_all(reply, len);
	reply[len] = '\0';
	if (strncmp(reply, expect, strlen(expect)) != 0 || !strstr(reply, ";rc=0;"))
		die("unexpected answer to %s: %s", cmd, reply);
}

/* The value of key in an answer ("...;key=value;..."), copied to out. */
static void field(const char *reply, const char *key, char *out, size_t size)
{
	char pattern[80];
	const char *start, *end;
	snprintf(pattern, sizeof pattern, ";%s=", key);
	start = strstr(reply, pattern);
	if (!start)
		die("no %s in answer %s", key, reply);
	start += strlen(pattern);
	end = strchr(start, ';');
	if (!end || (size_t)(end - start) >= size)
		die("bad %s in answer %s", key, reply);
	memcpy(out, start, (size_t)(end - start));
	out[end - start] = '\0';
}

static const char *env(const char *name)
{
	const char *value = getenv(name);
	if (!value || !*value)
		die("%s is not set: run me with srun --mpi=pmi2", name);
	return value;
}

int main(int argc, char **argv)
{
	char msg[MAX_MSG], reply[MAX_MSG], text[MAX_MSG], host[256];
	int rank, size, i;

	if (argc != 2 || strchr(argv[1], ';') || strlen(argv[1]) > 512)
		die("usage: pmi2_allgather VALUE (no ';', at most 512 bytes)");
	pmi_fd = atoi(env("PMI_FD"));
	rank = atoi(env("PMI_RANK"));
	if (gethostname(host, sizeof host) != 0)
		die("gethostname: %s", strerror(errno));

	const char *init = "cmd=init pmi_version=2 pmi_subversion=0\n";
	write_all(init, strlen(init));
	read_line(reply, sizeof reply);
	if (strncmp(reply, "cmd=response_to_init ", 21) != 0 || !strstr(reply, " rc=0 "))
		die("handshake refused: %s", reply);

	snprintf(msg, sizeof msg, "cmd=fullinit;pmijobid=%s;pmirank=%d;threaded=FALSE;",
		 env("PMI_JOBID"), rank);
	command(msg, reply, "cmd=fullinit-response;");
	field(reply, "rank", text, sizeof text);
	if (atoi(text) != rank)
		die("fullinit says rank %s, PMI_RANK says %d", text, rank);
	field(reply, "size", text, sizeof text);
	size = atoi(text);

	snprintf(msg, sizeof msg, "cmd=kvs-put;key=rank-%d;value=%s;", rank, argv[1]);
	command(msg, reply, "cmd=kvs-put-response;");
	command("cmd=kvs-fence;", reply, "cmd=kvs-fence-response;");

	printf("rank %d/%d on %s:", rank, size, host);
	for (i = 0; i < size; i++) {
		snprintf(msg, sizeof msg, "cmd=kvs-get;key=rank-%d;", i);
		command(msg, reply, "cmd=kvs-get-response;");
		field(reply, "found", text, sizeof text);
		if (strcmp(text, "TRUE") != 0)
			die("rank %d's value not found", i);
		field(reply, "value", text, sizeof text);
		printf(" %s", text);
	}
	printf("\n");
	fflush(stdout);

	command("cmd=finalize;", reply, "cmd=finalize-response;");
	return 0;
}
