/*
 * keel-vsock: socket plumbing for the lab tests, in the L2 guest and in L1:
 * vsock (busybox has none), Unix sockets, and TCP with 64 KiB reads and
 * writes (busybox nc moves data in small pieces, which in the nested lab
 * costs an exit per few KiB and makes 100 MiB take minutes).
 *
 *   keel-vsock connect CID PORT        AF_VSOCK client: stdin -> socket,
 *                                      socket -> stdout
 *   keel-vsock echo PORT               AF_VSOCK server: accept one connection,
 *                                      send back all it sends, until EOF
 *   keel-vsock unix-connect PATH PORT  connect to a VMM's vsock Unix socket,
 *                                      "CONNECT PORT\n" / "OK n\n", then as
 *                                      connect
 *   keel-vsock unix-echo PATH          Unix-socket server at PATH (a VMM
 *                                      connects there for guest port P when
 *                                      PATH is SOCKET_P): as echo
 *   keel-vsock tcp-connect IPV4 PORT   TCP client: as connect
 *   keel-vsock tcp-listen PORT         TCP server: accept one connection,
 *                                      then as connect
 *
 * Servers print "KEEL-VSOCK LISTENING <port or path>" on stderr once they
 * listen, and "KEEL-VSOCK ECHOED <bytes>" when the connection ends. When
 * stdin ends, connect half-closes the socket and goes on copying the socket
 * to stdout until the peer closes. Exit status: 0 done, 1 a failed call
 * (its name on stderr), 2 bad usage. Freestanding (no libc): built by
 * ci/guest-kit with `gcc -static -nostdlib -Os`, like keel-cmos.
 */

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_poll 7
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_sendto 44
#define SYS_shutdown 48
#define SYS_bind 49
#define SYS_listen 50
#define SYS_setsockopt 54
#define SYS_exit 60
#define SYS_unlink 87

#define AF_UNIX 1
#define AF_INET 2
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define SHUT_WR 1
#define MSG_NOSIGNAL 0x4000
#define POLLIN 1
#define POLLHUP 16
#define EINTR 4
#define VMADDR_CID_ANY 0xffffffffu

struct sockaddr_vm {
	unsigned short family;
	unsigned short reserved1;
	unsigned int port;
	unsigned int cid;
	unsigned char zero[4];
};

struct sockaddr_un {
	unsigned short family;
	char path[108];
};

struct pollfd {
	int fd;
	short events;
	short revents;
};

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

static char buf[65536];

static long len(const char *s)
{
	long n = 0;

	while (s[n])
		n++;
	return n;
}

static int same(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

static void put(int fd, const char *s)
{
	sys3(SYS_write, fd, s, len(s));
}

static void put_num(int fd, unsigned long v)
{
	char d[24];
	int i = sizeof(d) - 1;

	d[i] = 0;
	do {
		d[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	put(fd, d + i);
}

static void quit(int status)
{
	sys3(SYS_exit, status, 0, 0);
	for (;;)
		;
}

/* Exits with status 1 naming the call that failed and its errno. */
static long check(long ret, const char *what)
{
	if (ret < 0) {
		put(2, "keel-vsock: ");
		put(2, what);
		put(2, " failed: errno ");
		put_num(2, (unsigned long)-ret);
		put(2, "\n");
		quit(1);
	}
	return ret;
}

static void usage(void)
{
	put(2, "usage: keel-vsock connect CID PORT | echo PORT | unix-connect PATH PORT | "
	       "unix-echo PATH | tcp-connect IPV4 PORT | tcp-listen PORT\n");
	quit(2);
}

struct sockaddr_in {
	unsigned short family;
	unsigned short port; /* network order */
	unsigned int addr;   /* network order */
	unsigned char zero[8];
};

static unsigned short be16(unsigned int v)
{
	return (unsigned short)(((v & 0xff) << 8) | ((v >> 8) & 0xff));
}

static unsigned int number(const char *s)
{
	unsigned long v = 0;

	if (!*s)
		usage();
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			usage();
		v = v * 10 + (unsigned long)(*s - '0');
		if (v > 0xffffffffu)
			usage();
	}
	return (unsigned int)v;
}

static long xread(int fd, void *p, long n)
{
	long r;

	do
		r = sys3(SYS_read, fd, p, n);
	while (r == -EINTR);
	return r;
}

/* Writes all of p; a socket gets MSG_NOSIGNAL so a closed peer is an error,
 * not SIGPIPE. */
static void write_all(int fd, const char *p, long n, int is_socket)
{
	while (n > 0) {
		long w = is_socket ? sys6(SYS_sendto, fd, (long)p, n, MSG_NOSIGNAL, 0, 0)
				   : sys3(SYS_write, fd, p, n);
		if (w == -EINTR)
			continue;
		check(w, is_socket ? "send" : "write");
		p += w;
		n -= w;
	}
}

/* stdin -> s, s -> stdout, until s reaches EOF. */
static int relay(int s)
{
	struct pollfd fds[2] = { { 0, POLLIN, 0 }, { s, POLLIN, 0 } };
	int stdin_open = 1;

	for (;;) {
		long r = sys3(SYS_poll, stdin_open ? fds : fds + 1, stdin_open ? 2 : 1, -1);
		if (r == -EINTR)
			continue;
		check(r, "poll");
		if (stdin_open && (fds[0].revents & (POLLIN | POLLHUP))) {
			long n = check(xread(0, buf, sizeof(buf)), "read stdin");
			if (n == 0) {
				check(sys3(SYS_shutdown, s, SHUT_WR, 0), "shutdown");
				stdin_open = 0;
			} else {
				write_all(s, buf, n, 1);
			}
		}
		if (fds[1].revents) {
			long n = check(xread(s, buf, sizeof(buf)), "read socket");
			if (n == 0)
				return 0;
			write_all(1, buf, n, 0);
		}
	}
}

static int echo(int s)
{
	unsigned long total = 0;

	for (;;) {
		long n = check(xread(s, buf, sizeof(buf)), "read socket");
		if (n == 0)
			break;
		write_all(s, buf, n, 1);
		total += (unsigned long)n;
	}
	sys3(SYS_shutdown, s, SHUT_WR, 0);
	put(2, "KEEL-VSOCK ECHOED ");
	put_num(2, total);
	put(2, "\n");
	return 0;
}

/* Listens on addr, prints the listening line, accepts one connection. */
static int accept_one(int family, const void *addr, long addr_len, const char *what)
{
	int l = (int)check(sys3(SYS_socket, family, SOCK_STREAM, 0), "socket");
	int s, one = 1;

	/* A TCP port a previous run used may still have connections in
	 * TIME_WAIT. (SOL_SOCKET, SO_REUSEADDR) */
	if (family == AF_INET)
		check(sys6(SYS_setsockopt, l, 1, 2, (long)&one, sizeof(one), 0), "setsockopt");
	check(sys3(SYS_bind, l, addr, addr_len), "bind");
	check(sys3(SYS_listen, l, 1, 0), "listen");
	put(2, "KEEL-VSOCK LISTENING ");
	put(2, what);
	put(2, "\n");
	do
		s = (int)sys3(SYS_accept, l, 0, 0);
	while (s == -EINTR);
	check(s, "accept");
	sys3(SYS_close, l, 0, 0);
	return s;
}

static void unix_addr(struct sockaddr_un *a, const char *path)
{
	long n = len(path), i;

	if (n >= (long)sizeof(a->path)) {
		put(2, "keel-vsock: socket path too long\n");
		quit(2);
	}
	a->family = AF_UNIX;
	for (i = 0; i <= n; i++)
		a->path[i] = path[i];
}

/* Sends "CONNECT port\n" and checks the "OK ...\n" answer, read byte by byte
 * so nothing after it is consumed. */
static void handshake(int s, const char *port)
{
	char line[64];
	long n = 0;

	write_all(s, "CONNECT ", 8, 1);
	write_all(s, port, len(port), 1);
	write_all(s, "\n", 1, 1);
	for (;;) {
		long r = check(xread(s, line + n, 1), "read handshake");
		if (r == 0 || n == (long)sizeof(line) - 1)
			break;
		if (line[n++] == '\n')
			break;
	}
	line[n] = 0;
	if (n < 3 || line[0] != 'O' || line[1] != 'K' || line[2] != ' ') {
		put(2, "keel-vsock: CONNECT ");
		put(2, port);
		put(2, " refused: ");
		put(2, n ? line : "connection closed\n");
		quit(1);
	}
}

/* a.b.c.d into network order, or usage. */
static unsigned int ipv4(const char *s)
{
	unsigned int v = 0, part = 0, dots = 0, digits = 0;

	for (;; s++) {
		if (*s >= '0' && *s <= '9') {
			part = part * 10 + (unsigned int)(*s - '0');
			if (part > 255 || ++digits > 3)
				usage();
		} else if ((*s == '.' || !*s) && digits) {
			v |= part << (8 * dots);
			part = digits = 0;
			if (!*s)
				break;
			if (++dots > 3)
				usage();
		} else {
			usage();
		}
	}
	if (dots != 3)
		usage();
	return v;
}

static int run(long argc, char **argv)
{
	struct sockaddr_vm vm = { AF_VSOCK, 0, 0, 0, { 0 } };
	struct sockaddr_un un = { 0, { 0 } };
	const char *cmd;
	int s;

	if (argc < 3)
		usage();
	cmd = argv[1];
	if (argc == 4 && same(cmd, "connect")) {
		vm.cid = number(argv[2]);
		vm.port = number(argv[3]);
		s = (int)check(sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), "socket");
		check(sys3(SYS_connect, s, &vm, sizeof(vm)), "connect");
		return relay(s);
	}
	if (argc == 3 && same(cmd, "echo")) {
		vm.cid = VMADDR_CID_ANY;
		vm.port = number(argv[2]);
		return echo(accept_one(AF_VSOCK, &vm, sizeof(vm), argv[2]));
	}
	if (argc == 4 && same(cmd, "unix-connect")) {
		number(argv[3]);
		unix_addr(&un, argv[2]);
		s = (int)check(sys3(SYS_socket, AF_UNIX, SOCK_STREAM, 0), "socket");
		check(sys3(SYS_connect, s, &un, sizeof(un)), "connect");
		handshake(s, argv[3]);
		return relay(s);
	}
	if (argc == 4 && same(cmd, "tcp-connect")) {
		struct sockaddr_in in = { AF_INET, be16(number(argv[3])), ipv4(argv[2]), { 0 } };

		s = (int)check(sys3(SYS_socket, AF_INET, SOCK_STREAM, 0), "socket");
		check(sys3(SYS_connect, s, &in, sizeof(in)), "connect");
		return relay(s);
	}
	if (argc == 3 && same(cmd, "tcp-listen")) {
		struct sockaddr_in in = { AF_INET, be16(number(argv[2])), 0, { 0 } };

		return relay(accept_one(AF_INET, &in, sizeof(in), argv[2]));
	}
	if (argc == 3 && same(cmd, "unix-echo")) {
		unix_addr(&un, argv[2]);
		sys3(SYS_unlink, argv[2], 0, 0);
		return echo(accept_one(AF_UNIX, &un, sizeof(un), argv[2]));
	}
	usage();
	return 2;
}

void __attribute__((used)) keel_main(long *sp)
{
	quit(run(sp[0], (char **)(sp + 1)));
}

/* The kernel enters with the stack pointer at argc; keep it 16-byte aligned. */
__asm__(".globl _start\n"
	"_start:\n"
	"  mov %rsp, %rdi\n"
	"  and $-16, %rsp\n"
	"  call keel_main\n"
	"  hlt\n");
