/*
 * keel-cmos: read or write one byte of the PC CMOS/RTC NVRAM through ports
 * 0x70/0x71, for L2 test scripts. Debian's cloud kernel has no /dev/port
 * (CONFIG_DEVPORT is off) and /dev/nvram insists on a BIOS checksum, so the
 * test initramfs carries this instead.
 *
 *   keel-cmos INDEX          prints the byte at INDEX as two hex digits
 *   keel-cmos INDEX VALUE    writes VALUE to INDEX
 *
 * INDEX and VALUE are decimal or 0x-prefixed hex. Freestanding (no libc):
 * built by ci/guest-kit with `gcc -static -nostdlib -Os`.
 */

#define SYS_write 1
#define SYS_iopl 172
#define SYS_exit 60

static long sys3(long n, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static void out8(unsigned short port, unsigned char v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static unsigned char in8(unsigned short port)
{
	unsigned char v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static void die(const char *msg, long len)
{
	sys3(SYS_write, 2, (long)msg, len);
	sys3(SYS_exit, 2, 0, 0);
	for (;;)
		;
}

#define DIE(s) die(s, sizeof(s) - 1)

static long parse(const char *s)
{
	long v = 0;
	int base = 10;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		DIE("keel-cmos: empty number\n");
	for (; *s; s++) {
		int d;

		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			DIE("keel-cmos: bad number\n");
		if (d >= base)
			DIE("keel-cmos: bad number\n");
		v = v * base + d;
		if (v > 0xff)
			DIE("keel-cmos: number out of range\n");
	}
	return v;
}

static int run(long argc, char **argv)
{
	static const char hex[] = "0123456789abcdef";
	long index, value;
	char buf[3];

	if (argc != 2 && argc != 3)
		DIE("usage: keel-cmos INDEX [VALUE]\n");
	index = parse(argv[1]);
	if (index > 0x7f)
		DIE("keel-cmos: INDEX must be below 0x80\n");
	if (sys3(SYS_iopl, 3, 0, 0) != 0)
		DIE("keel-cmos: iopl failed\n");
	/* Bit 7 of the index port masks NMIs: leave it clear. */
	out8(0x70, (unsigned char)index);
	if (argc == 3) {
		value = parse(argv[2]);
		out8(0x71, (unsigned char)value);
		return 0;
	}
	value = in8(0x71);
	buf[0] = hex[value >> 4];
	buf[1] = hex[value & 15];
	buf[2] = '\n';
	sys3(SYS_write, 1, (long)buf, 3);
	return 0;
}

void __attribute__((used)) keel_main(long *sp)
{
	sys3(SYS_exit, run(sp[0], (char **)(sp + 1)), 0, 0);
}

/* The kernel enters with the stack pointer at argc; keep it 16-byte aligned. */
__asm__(".globl _start\n"
	"_start:\n"
	"  mov %rsp, %rdi\n"
	"  and $-16, %rsp\n"
	"  call keel_main\n"
	"  hlt\n");
