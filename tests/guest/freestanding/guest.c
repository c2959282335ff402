// SPDX-License-Identifier: Apache-2.0
/*
 * Keel's freestanding test guest.
 *
 * Booted through the PVH ABI on the boot CPU only, it reports what the VMM
 * gave it on COM1, one "KEEL-GUEST ..." line per fact (the protocol is parsed
 * by tests/src/freestanding.rs), then powers off, reboots, halts, spins or
 * triple-faults as `keel.mode=` on the command line asks. `keel.mode=virtio`
 * and `keel.mode=hostile` drive the virtio-pci devices first (virtio.c).
 *
 * Every guest memory access is expensive on kvm_pvm, so the code reads each
 * byte it needs once, in dwords where it can, and keeps to registers.
 * Physical addresses above 4 GiB are out of reach (paging stays off).
 */

#include "guest.h"

#define COM1 0x3f8

#define START_INFO_MAGIC 0x336ec578u

/* Four ASCII characters as the little-endian dword they read as. */
#define SIG(a, b, c, d) \
	((u32)(a) | (u32)(b) << 8 | (u32)(c) << 16 | (u32)(d) << 24)

/* struct hvm_start_info, as laid out by the PVH boot ABI. */
struct start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};

struct memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

/* FADT field offsets (ACPI 6.x, table 5.9). */
#define FADT_DSDT 40
#define FADT_PM1A_CNT_BLK 64
#define FADT_FLAGS 112
#define FADT_RESET_REG 116
#define FADT_RESET_VALUE 128
#define FADT_X_DSDT 140
#define FADT_SLEEP_CONTROL_REG 244
#define FADT_FLAG_RESET_REG_SUP (1u << 10)
#define FADT_FLAG_HW_REDUCED (1u << 20)

/* Generic Address Structure address spaces. */
#define GAS_MEMORY 0
#define GAS_IO 1

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define CMOS_REBOOT_BYTE 0x40
#define CMOS_REBOOT_MAGIC 0x5a

/* How long to wait for a poweroff or reset write to take effect, in TSC
 * ticks: about 0.1-0.3 s. VMMs may run the vCPU on for a while after the
 * write (QEMU does), and the guest should not cry failure meanwhile. */
#define SETTLE_TSC (1ull << 28)

enum mode {
	MODE_POWEROFF,
	MODE_REBOOT,
	MODE_TRIPLEFAULT,
	MODE_HALT,
	MODE_SPIN,
	MODE_TICK,
	MODE_VIRTIO,
	MODE_HOSTILE,
};

/* What the ACPI walk found and the end of the run needs. */
struct acpi {
	u32 fadt;
	u32 fadt_len;
	u32 slp_typ;
};

void putc(char c)
{
	outb(COM1, (u8)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

/* Starts a report line: "KEEL-GUEST <what>". */
void line(const char *what)
{
	puts("KEEL-GUEST ");
	puts(what);
}

void put_hex(u64 v)
{
	int shift = 60;

	putc('0');
	putc('x');
	while (shift > 0 && !(v >> shift))
		shift -= 4;
	for (; shift >= 0; shift -= 4) {
		u32 d = (u32)(v >> shift) & 15;

		putc((char)(d < 10 ? '0' + d : 'a' - 10 + d));
	}
}

void put_dec(u64 v)
{
	char buf[20];
	int n = 0;

	do {
		u32 hi = (u32)(v >> 32), lo = (u32)v, rem = hi % 10;

		/* 64-by-32 division without libgcc: the high half first, then
		 * divl on (remainder:low), whose quotient fits 32 bits. */
		hi /= 10;
		__asm__("divl %4" : "=a"(lo), "=d"(rem) : "0"(lo), "1"(rem), "rm"(10u));
		v = (u64)hi << 32 | lo;
		buf[n++] = (char)('0' + rem);
	} while (v);
	while (n)
		putc(buf[--n]);
}

static void put_sig(u32 sig)
{
	for (int i = 0; i < 4; i++, sig >>= 8) {
		u8 c = (u8)sig;

		putc(c > ' ' && c < 0x7f ? (char)c : '?');
	}
}

static __attribute__((noreturn)) void triple_fault(void)
{
	static const struct {
		u16 limit;
		u32 base;
	} __attribute__((packed)) no_idt = { 0, 0 };

	/* With an empty IDT, the #UD from ud2 cannot be delivered, nor can the
	 * #GP and #DF that follow, and the CPU shuts down. Not int3: KVM's
	 * instruction emulator (all a 32-bit guest gets on kvm_pvm) does not
	 * know software interrupts and fails with an internal error instead. */
	__asm__ volatile("cli; lidt %0; ud2" : : "m"(no_idt));
	for (;;)
		__asm__ volatile("hlt");
}

static __attribute__((noreturn)) void fail(const char *why)
{
	line("ERROR ");
	puts(why);
	putc('\n');
	triple_fault();
}

static __attribute__((noreturn)) void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* A running counter for pause/resume tests: "TICK <n>" about every 25 ms
 * of TSC time, forever. While the vCPU is paused no line appears. */
static __attribute__((noreturn)) void tick_forever(void)
{
	u64 n = 0, next = rdtsc();

	for (;;) {
		while (rdtsc() < next)
			;
		line("TICK ");
		put_dec(n++);
		putc('\n');
		next = rdtsc() + (1ull << 26);
	}
}

static void settle(void)
{
	u64 start = rdtsc();

	while (rdtsc() - start < SETTLE_TSC)
		;
}

/* A 64-bit physical address the guest can reach, or a fatal error. */
static u32 low_addr(u64 addr, const char *what)
{
	if (addr >> 32) {
		line("ERROR above 4 GiB: ");
		puts(what);
		putc('\n');
		triple_fault();
	}
	return (u32)addr;
}

/* ---- memory map and command line --------------------------------------- */

static void report_memmap(const struct start_info *si)
{
	u64 total = 0;

	if (si->version >= 1) {
		u32 p = low_addr(si->memmap_paddr, "memmap");
		u32 n = si->memmap_entries;

		for (const struct memmap_entry *e = (const void *)p; n; n--, e++) {
			u64 addr = e->addr, size = e->size;
			u32 type = e->type;

			line("MEM ");
			put_hex(addr);
			putc(' ');
			put_hex(size);
			putc(' ');
			put_dec(type);
			putc('\n');
			if (type == 1)
				total += size;
		}
	}
	line("MEMTOTAL ");
	put_dec(total >> 10);
	putc('\n');
}

/* Whether `p` starts with `word` followed by a space or the end. */
static int word_is(const char *p, const char *word)
{
	while (*word)
		if (*p++ != *word++)
			return 0;
	return *p == ' ' || *p == '\0';
}

static enum mode parse_mode(const char *cmdline)
{
	static const char key[] = "keel.mode=";
	const char *p = cmdline, *v = 0;

	/* The last keel.mode= wins, as with kernel parameters. */
	for (; *p; p++) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		const char *k = key, *q = p;

		while (*k && *q == *k)
			q++, k++;
		if (!*k)
			v = q;
	}
	if (!v || word_is(v, "poweroff"))
		return MODE_POWEROFF;
	if (word_is(v, "reboot"))
		return MODE_REBOOT;
	if (word_is(v, "triplefault"))
		return MODE_TRIPLEFAULT;
	if (word_is(v, "halt"))
		return MODE_HALT;
	if (word_is(v, "spin"))
		return MODE_SPIN;
	if (word_is(v, "tick"))
		return MODE_TICK;
	if (word_is(v, "virtio"))
		return MODE_VIRTIO;
	if (word_is(v, "hostile"))
		return MODE_HOSTILE;
	line("ERROR unknown keel.mode ");
	while (*v && *v != ' ')
		putc(*v++);
	putc('\n');
	triple_fault();
}

static enum mode report_cmdline(const struct start_info *si)
{
	const char *cmdline;

	if (!si->cmdline_paddr)
		return MODE_POWEROFF;
	cmdline = (const char *)low_addr(si->cmdline_paddr, "cmdline");
	line("CMDLINE ");
	puts(cmdline);
	putc('\n');
	return parse_mode(cmdline);
}

/* ---- ACPI -------------------------------------------------------------- */

/*
 * Sums `len` bytes at `addr` (mod 256), reading dwords. With `s5` set, also
 * looks for the AML name "_S5_" followed by a PackageOp in the same pass and
 * stores where the first one starts (0 if none).
 */
static u8 acpi_sum(u32 addr, u32 len, u32 *s5)
{
	u32 sum = 0, prev = 0, found = 0, i;

	for (i = 0; i + 4 <= len; i += 4) {
		u32 d = rd32(addr + i);

		/* The low byte of this accumulates the sum of all four bytes. */
		sum += d + (d >> 8) + (d >> 16) + (d >> 24);
		if (s5 && !found) {
			u64 w = (u64)d << 32 | prev;

			/* Matches that end in this dword; "_S5_" has no NUL, so
			 * the zero `prev` of the first dword cannot match. */
			for (u32 k = 1; k <= 4; k++) {
				u32 at = addr + i - 4 + k;

				if ((u32)(w >> (8 * k)) == SIG('_', 'S', '5', '_') &&
				    at + 4 < addr + len && rd8(at + 4) == 0x12) {
					found = at;
					break;
				}
			}
		}
		prev = d;
	}
	for (; i < len; i++)
		sum += rd8(addr + i);
	if (s5)
		*s5 = found;
	return (u8)sum;
}

static void report_table(u32 sig, u32 addr, u32 len)
{
	line("ACPI ");
	put_sig(sig);
	putc(' ');
	put_hex(addr);
	putc(' ');
	put_dec(len);
	putc('\n');
}

/* Checks a system description table's header and checksum; returns its
 * length. With `s5`, also finds "_S5_" (see acpi_sum). */
static u32 check_table(u32 addr, u32 sig, u32 *s5)
{
	u32 got = rd32(addr), len = rd32(addr + 4);

	if (sig && got != sig)
		fail("bad ACPI table signature");
	if (len < 36)
		fail("ACPI table shorter than its header");
	if (acpi_sum(addr, len, s5))
		fail("bad ACPI table checksum");
	report_table(got, addr, len);
	return len;
}

static u32 find_rsdp(const struct start_info *si)
{
	if (si->rsdp_paddr)
		return low_addr(si->rsdp_paddr, "RSDP");
	for (u32 p = 0xe0000; p < 0x100000; p += 16)
		if (rd32(p) == SIG('R', 'S', 'D', ' ') && rd32(p + 4) == SIG('P', 'T', 'R', ' ') &&
		    !acpi_sum(p, 20, 0))
			return p;
	fail("no RSDP");
}

static void report_cpus(u32 madt, u32 len)
{
	u32 end = madt + len, n = 0;

	for (u32 p = madt + 44; p + 2 <= end;) {
		/* type, length and, for a Local APIC, processor and APIC ids. */
		u32 head = rd32(p), elen = head >> 8 & 0xff, id = 0, enabled = 0;

		if (elen < 2 || p + elen > end)
			fail("bad MADT entry");
		if ((head & 0xff) == 0 && elen >= 8) {
			id = head >> 24;
			enabled = rd32(p + 4) & 1;
		} else if ((head & 0xff) == 9 && elen >= 16) {
			id = rd32(p + 4);
			enabled = rd32(p + 8) & 1;
		}
		if (enabled) {
			line("CPU apic=");
			put_dec(id);
			putc('\n');
			n++;
		}
		p += elen;
	}
	if (!n)
		fail("no enabled CPU in the MADT");
	line("CPUS ");
	put_dec(n);
	putc('\n');
}

/* Reads the first element of the \_S5_ package: SLP_TYPa. */
static u32 parse_s5(u32 p, u32 end)
{
	u32 lead, op;

	p += 5; /* "_S5_" and PackageOp */
	if (p >= end)
		fail("truncated _S5_");
	lead = rd8(p);
	p += 1 + (lead >> 6); /* PkgLength */
	p += 1;		      /* NumElements */
	if (p >= end)
		fail("truncated _S5_");
	op = rd8(p);
	if (op <= 1)
		return op; /* ZeroOp, OneOp */
	if (op >= 0x0a && op <= 0x0c && p + 1 < end)
		return rd8(p + 1); /* Byte/Word/DWordPrefix: the low byte will do */
	fail("bad _S5_ package");
}

static void walk_acpi(const struct start_info *si, struct acpi *acpi)
{
	u32 rsdp = find_rsdp(si), rev, root, entry_size, root_len, madt = 0, madt_len = 0;
	u32 dsdt, dsdt_len, s5;

	rev = rd8(rsdp + 15);
	if (rd32(rsdp) != SIG('R', 'S', 'D', ' ') || rd32(rsdp + 4) != SIG('P', 'T', 'R', ' '))
		fail("bad RSDP signature");
	if (acpi_sum(rsdp, 20, 0))
		fail("bad RSDP checksum");
	if (rev >= 2) {
		u32 len = rd32(rsdp + 20);

		if (len < 36 || acpi_sum(rsdp, len, 0))
			fail("bad RSDP extended checksum");
		report_table(SIG('R', 'S', 'D', 'P'), rsdp, len);
		root = low_addr(rd64(rsdp + 24), "XSDT");
		entry_size = 8;
		root_len = check_table(root, SIG('X', 'S', 'D', 'T'), 0);
	} else {
		report_table(SIG('R', 'S', 'D', 'P'), rsdp, 20);
		root = rd32(rsdp + 16);
		entry_size = 4;
		root_len = check_table(root, SIG('R', 'S', 'D', 'T'), 0);
	}

	acpi->fadt = 0;
	for (u32 p = root + 36; p + entry_size <= root + root_len; p += entry_size) {
		u32 t = entry_size == 8 ? low_addr(rd64(p), "ACPI table") : rd32(p);
		u32 sig = rd32(t), len = check_table(t, 0, 0);

		if (sig == SIG('A', 'P', 'I', 'C')) {
			madt = t;
			madt_len = len;
		} else if (sig == SIG('F', 'A', 'C', 'P')) {
			acpi->fadt = t;
			acpi->fadt_len = len;
		}
	}
	if (!madt)
		fail("no MADT");
	if (!acpi->fadt)
		fail("no FADT");
	if (acpi->fadt_len < FADT_FLAGS + 4)
		fail("FADT too short");

	dsdt = 0;
	if (acpi->fadt_len >= FADT_X_DSDT + 8)
		dsdt = low_addr(rd64(acpi->fadt + FADT_X_DSDT), "DSDT");
	if (!dsdt)
		dsdt = rd32(acpi->fadt + FADT_DSDT);
	if (!dsdt)
		fail("no DSDT");
	dsdt_len = check_table(dsdt, SIG('D', 'S', 'D', 'T'), &s5);

	report_cpus(madt, madt_len);

	if (!s5)
		fail("no _S5_ in the DSDT");
	acpi->slp_typ = parse_s5(s5, dsdt + dsdt_len) & 7;
}

/* ---- the end of the run ------------------------------------------------- */

/* Writes a byte through a Generic Address Structure; other spaces than
 * system I/O and memory are ignored (the caller reports that it did not
 * work). */
static void gas_write8(u32 gas, u8 val)
{
	u8 space = rd8(gas);
	u64 addr = rd64(gas + 4);

	if (space == GAS_IO)
		outb((u16)addr, val);
	else if (space == GAS_MEMORY && !(addr >> 32))
		*(volatile u8 *)(u32)addr = val;
}

static __attribute__((noreturn)) void poweroff(const struct acpi *acpi)
{
	u32 flags = rd32(acpi->fadt + FADT_FLAGS);
	u32 pm1a = rd32(acpi->fadt + FADT_PM1A_CNT_BLK);

	if ((flags & FADT_FLAG_HW_REDUCED) || !pm1a) {
		if (acpi->fadt_len < FADT_SLEEP_CONTROL_REG + 12)
			fail("no SLEEP_CONTROL_REG in the FADT");
		line("POWEROFF\n");
		gas_write8(acpi->fadt + FADT_SLEEP_CONTROL_REG, (u8)(acpi->slp_typ << 2 | 0x20));
	} else {
		line("POWEROFF\n");
		outw((u16)pm1a, (u16)(acpi->slp_typ << 10 | 1u << 13));
	}
	/* A VMM may run the vCPU a little longer before it stops it. */
	settle();
	line("ERROR poweroff did not happen\n");
	halt_forever();
}

static __attribute__((noreturn)) void reboot(const struct acpi *acpi)
{
	u8 mark;

	outb(CMOS_INDEX, CMOS_REBOOT_BYTE);
	mark = inb(CMOS_DATA);
	if (mark == CMOS_REBOOT_MAGIC) {
		line("SECOND-BOOT\n");
		outb(CMOS_INDEX, CMOS_REBOOT_BYTE);
		outb(CMOS_DATA, 0);
		poweroff(acpi);
	}
	if (mark)
		fail("unexpected value in CMOS byte 0x40");
	outb(CMOS_INDEX, CMOS_REBOOT_BYTE);
	outb(CMOS_DATA, CMOS_REBOOT_MAGIC);
	line("REBOOTING\n");
	if (acpi->fadt_len >= FADT_RESET_VALUE + 1 &&
	    (rd32(acpi->fadt + FADT_FLAGS) & FADT_FLAG_RESET_REG_SUP))
		gas_write8(acpi->fadt + FADT_RESET_REG, rd8(acpi->fadt + FADT_RESET_VALUE));
	settle();
	outb(0x64, 0xfe); /* i8042: pulse the reset line */
	settle();
	fail("reset did not happen");
}

__attribute__((noreturn, used)) void keel_main(const struct start_info *si);

__attribute__((noreturn, used)) void keel_main(const struct start_info *si)
{
	struct acpi acpi;
	enum mode mode;

	if (si->magic != START_INFO_MAGIC)
		fail("bad start_info magic");
	report_memmap(si);
	mode = report_cmdline(si);
	walk_acpi(si, &acpi);

	switch (mode) {
	case MODE_TRIPLEFAULT:
		line("TRIPLEFAULT\n");
		triple_fault();
	case MODE_HALT:
		line("HALT\n");
		halt_forever();
	case MODE_SPIN:
		line("SPIN\n");
		for (;;)
			__asm__ volatile("");
	case MODE_TICK:
		tick_forever();
	case MODE_REBOOT:
		reboot(&acpi);
	case MODE_VIRTIO:
		virtio_mode();
		break;
	case MODE_HOSTILE:
		hostile_mode();
		break;
	case MODE_POWEROFF:
		break;
	}
	poweroff(&acpi);
}
