// SPDX-License-Identifier: Apache-2.0
/*
 * A virtio-pci driver for Keel's freestanding test guest (modern devices
 * only, virtio 1.2 §4.1), and the two modes built on it:
 *
 *   keel.mode=virtio   well-behaved requests: rng, blk read/write/GET_ID,
 *                      console output; one "VIRTIO ..." line per result.
 *   keel.mode=hostile  the same, then malformed requests and register games
 *                      on every device, one "HOSTILE <dev>.<attack> <outcome>"
 *                      line each, then well-behaved requests on every device
 *                      again ("HOSTILE <dev>.final ...") and "HOSTILE done".
 *
 * Outcomes of an attack: "error" (completed with an error status, or, for
 * rng, nothing written), "needs-reset" (DEVICE_NEEDS_RESET set), "ignored"
 * (neither within a short bound), "ok" (completed fine: only acceptable for
 * requests that are legal), "done" (consumed by a transmit queue, which has
 * no error channel). After each attack the device is reset and must serve a
 * well-behaved request again; if it does not, the outcome is "timeout" (no
 * answer within a long bound) or "broken" (answered wrongly).
 *
 * There are no interrupts: MSI-X stays disabled, every vector is NO_VECTOR
 * and the driver polls the used ring, always with a TSC bound. BARs that
 * read 0 (QEMU without firmware) are assigned from 0xc0000000 upward.
 * Every memory access traps on kvm_pvm, so requests are few and small.
 */

#include "guest.h"

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc
#define VIRTIO_VENDOR 0x1af4

enum { T_NET = 1, T_BLK = 2, T_CONSOLE = 3, T_RNG = 4, T_VSOCK = 19 };

/* Capability ids and virtio cfg_types. */
#define CAP_PM 0x01
#define CAP_VENDOR 0x09
#define CAP_MSIX 0x11
#define VCAP_COMMON 1
#define VCAP_NOTIFY 2
#define VCAP_ISR 3
#define VCAP_DEVICE 4
#define VCAP_PCI 5

/* Common configuration registers. */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_MSIX 0x10
#define CC_NUMQ 0x12
#define CC_STATUS 0x14
#define CC_QSELECT 0x16
#define CC_QSIZE 0x18
#define CC_QMSIX 0x1a
#define CC_QENABLE 0x1c
#define CC_QNOFF 0x1e
#define CC_QDESC 0x20
#define CC_QDRIVER 0x28
#define CC_QDEVICE 0x30
#define CC_LEN 0x38

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define NO_VECTOR 0xffff

#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4

#define BLK_IN 0
#define BLK_OUT 1
#define BLK_GET_ID 8

/* Each device's rings and buffers: 128 KiB of RAM from 4 MiB up (an rng
 * may fill up to 64 KiB of a buffer that claims 4 GiB). */
#define DEV_RAM 0x400000
#define DEV_RAM_EACH 0x20000
#define DESC 0x0000
#define AVAIL 0x1000
#define USED 0x2000
#define INDIR 0x3000
#define HDR 0x4000
#define STATUS 0x4800
#define DATA 0x5000
#define DATA2 0x6000
#define SIDE 0x7000		/* rings of the other queues, 0x400 each */
#define QSIZE 8

/* TSC bounds: ~13 ms for an attack's answer, ~1.6 s for a good request. */
#define SHORT (1ull << 25)
#define LONG (1ull << 32)

#define MAXDEV 8

struct vdev {
	u32 bdf, type, q;	/* the queue this driver uses */
	u32 common, notify, mult, isr, devcfg, devcfg_len;
	u32 msix, msix_tbl, msix_pba, msix_n, pm;
	u32 bar[6];
	u32 mem;
	u32 qsize, avail, used, noff;
	u32 sum;		/* blk: checksum of sector 0 */
};

struct ctx {
	struct vdev dev[MAXDEV];
	u32 n, next_bar;
	u32 rand;
};

/* ---- PCI configuration space through 0xcf8/0xcfc ----------------------- */

static u16 pci_sel(u32 bdf, u32 off)
{
	outl(PCI_ADDR, 0x80000000u | bdf << 8 | (off & 0xfc));
	return (u16)(PCI_DATA + (off & 3));
}

static u32 cfg_rd32(u32 bdf, u32 off)
{
	return inl(pci_sel(bdf, off));
}

static u32 cfg_rd8(u32 bdf, u32 off)
{
	return inb(pci_sel(bdf, off));
}

/* A write of 1, 2 or 4 bytes; unaligned ones straddle 0xcfc's end. */
static void cfg_wr(u32 bdf, u32 off, u32 val, u32 width)
{
	u16 port = pci_sel(bdf, off);

	if (width == 1)
		outb(port, (u8)val);
	else if (width == 2)
		outw(port, (u16)val);
	else
		outl(port, val);
}

static const char *type_name(u32 type)
{
	switch (type) {
	case T_NET:
		return "net";
	case T_BLK:
		return "blk";
	case T_CONSOLE:
		return "console";
	case T_RNG:
		return "rng";
	case T_VSOCK:
		return "vsock";
	}
	return "other";
}

/* Reads (and, where they read 0, assigns) the memory BARs. */
static void setup_bars(struct ctx *c, struct vdev *d)
{
	for (u32 i = 0; i < 6; i++) {
		u32 off = 0x10 + 4 * i, v = cfg_rd32(d->bdf, off), is64 = (v & 7) == 4;
		u32 base = v & ~0xfu;

		d->bar[i] = 0;
		if (v & 1)
			continue; /* I/O BAR */
		if (is64 && cfg_rd32(d->bdf, off + 4)) {
			i++; /* above 4 GiB: out of reach */
			continue;
		}
		if (!base) {
			u32 size;

			cfg_wr(d->bdf, off, ~0u, 4);
			size = -(cfg_rd32(d->bdf, off) & ~0xfu);
			if (size) {
				base = (c->next_bar + size - 1) & -size;
				c->next_bar = base + size;
			}
			cfg_wr(d->bdf, off, base, 4);
			if (is64)
				cfg_wr(d->bdf, off + 4, 0, 4);
		}
		d->bar[i] = base;
		i += is64;
	}
	/* Memory decoding and bus mastering (QEMU needs it for DMA). */
	cfg_wr(d->bdf, 4, (cfg_rd32(d->bdf, 4) & 0xffff) | 6, 2);
}

static u32 bar_addr(struct vdev *d, u32 bir_off)
{
	u32 bir = bir_off & 7;

	return bir < 6 && d->bar[bir] ? d->bar[bir] + (bir_off & ~7u) : 0;
}

static void walk_caps(struct vdev *d)
{
	u32 bdf = d->bdf, n = 0;

	if (!(cfg_rd32(bdf, 4) >> 16 & 0x10))
		return;
	for (u32 p = cfg_rd8(bdf, 0x34) & 0xfc; p && n < 48; p = cfg_rd8(bdf, p + 1) & 0xfc, n++) {
		u32 head = cfg_rd32(bdf, p), id = head & 0xff;

		if (id == CAP_MSIX) {
			d->msix = p;
			d->msix_n = (head >> 16 & 0x7ff) + 1;
			d->msix_tbl = bar_addr(d, cfg_rd32(bdf, p + 4));
			d->msix_pba = bar_addr(d, cfg_rd32(bdf, p + 8));
		} else if (id == CAP_PM) {
			d->pm = p;
		} else if (id == CAP_VENDOR) {
			u32 bar = cfg_rd8(bdf, p + 4), addr;

			if (bar > 5 || !d->bar[bar])
				continue;
			addr = d->bar[bar] + cfg_rd32(bdf, p + 8);
			/* The first capability of each type is the one to use. */
			switch (head >> 24) {
			case VCAP_COMMON:
				if (!d->common)
					d->common = addr;
				break;
			case VCAP_NOTIFY:
				if (!d->notify) {
					d->notify = addr;
					d->mult = cfg_rd32(bdf, p + 16);
				}
				break;
			case VCAP_ISR:
				if (!d->isr)
					d->isr = addr;
				break;
			case VCAP_DEVICE:
				if (!d->devcfg) {
					d->devcfg = addr;
					d->devcfg_len = cfg_rd32(bdf, p + 12);
				}
				break;
			}
		}
	}
}

static void enumerate(struct ctx *c)
{
	c->n = 0;
	c->next_bar = 0xc0000000;
	c->rand = 0x4b45454c;
	for (u32 slot = 0; slot < 32 && c->n < MAXDEV; slot++) {
		u32 bdf = slot << 3, id = cfg_rd32(bdf, 0), devid = id >> 16;
		struct vdev *d = &c->dev[c->n];

		if ((id & 0xffff) != VIRTIO_VENDOR || devid < 0x1040 || devid > 0x107f)
			continue;
		for (u32 *p = (u32 *)d; p < (u32 *)(d + 1); p++)
			*p = 0;
		d->bdf = bdf;
		d->type = devid - 0x1040;
		/* Transmit queues for console, net and vsock; the only one else. */
		d->q = d->type == T_CONSOLE || d->type == T_NET || d->type == T_VSOCK;
		d->mem = DEV_RAM + c->n * DEV_RAM_EACH;
		setup_bars(c, d);
		walk_caps(d);
		line("VIRTIO pci 00:");
		putc((char)('0' + slot / 10));
		putc((char)('0' + slot % 10));
		puts(".0 ");
		puts(type_name(d->type));
		if (!d->common || !d->notify) {
			puts(" unusable\n");
			continue;
		}
		putc('\n');
		c->n++;
	}
}

/* ---- device bring-up ------------------------------------------------------ */

static void wr64(u32 addr, u32 lo, u32 hi)
{
	wr32(addr, lo);
	wr32(addr + 4, hi);
}

static u32 status(struct vdev *d)
{
	return rd8(d->common + CC_STATUS);
}

/* Writes 0 to the status and waits (bounded) until it reads back 0. */
static int reset(struct vdev *d)
{
	u64 start = rdtsc();

	wr8(d->common + CC_STATUS, 0);
	while (status(d))
		if (rdtsc() - start > LONG)
			return -1;
	return 0;
}

/* Reset, ACKNOWLEDGE, DRIVER and VERSION_1 as the only feature; with
 * `features_ok`, FEATURES_OK too (checked). */
static int begin(struct vdev *d, int features_ok)
{
	u32 cc = d->common;

	if (reset(d))
		return -1;
	wr8(cc + CC_STATUS, S_ACK);
	wr8(cc + CC_STATUS, S_ACK | S_DRIVER);
	wr32(cc + CC_DFSELECT, 1);
	if (!(rd32(cc + CC_DF) & 1))
		return -1; /* not a modern device */
	wr32(cc + CC_GFSELECT, 0);
	wr32(cc + CC_GF, 0);
	wr32(cc + CC_GFSELECT, 1);
	wr32(cc + CC_GF, 1);
	wr16(cc + CC_MSIX, NO_VECTOR);
	if (!features_ok)
		return 0;
	wr8(cc + CC_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	return status(d) & S_FEATURES_OK ? 0 : -1;
}

/* How many queues the device needs enabled to work (receive queues stay
 * empty: no buffers are offered). */
static u32 queues_needed(struct vdev *d)
{
	switch (d->type) {
	case T_NET:
	case T_CONSOLE:
		return 2;
	case T_VSOCK:
		return 3;
	}
	return 1;
}

/* Enables queue `q` with QSIZE (or fewer) entries and empty rings at `at`. */
static void side_queue(struct vdev *d, u32 q, u32 at)
{
	u32 cc = d->common, max;

	wr16(cc + CC_QSELECT, (u16)q);
	max = rd16(cc + CC_QSIZE);
	if (!max)
		return;
	wr16(cc + CC_QSIZE, (u16)(max < QSIZE ? max : QSIZE));
	wr16(cc + CC_QMSIX, NO_VECTOR);
	wr32(at + 0x100, 0);
	wr32(at + 0x200, 0);
	wr64(cc + CC_QDESC, at, 0);
	wr64(cc + CC_QDRIVER, at + 0x100, 0);
	wr64(cc + CC_QDEVICE, at + 0x200, 0);
	wr16(cc + CC_QENABLE, 1);
}

/* Programs queue d->q with `size` entries and its rings at lo:hi (this
 * device's RAM when hi is 0 and lo is d->mem) and enables it, and the
 * device's other queues with their own empty rings. */
static int queue(struct vdev *d, u32 size, u32 lo, u32 hi)
{
	u32 cc = d->common, max, numq = rd16(cc + CC_NUMQ), need = queues_needed(d);

	for (u32 q = 0; q < need && q < numq; q++)
		if (q != d->q)
			side_queue(d, q, d->mem + SIDE + 0x400 * q);
	wr16(cc + CC_QSELECT, (u16)d->q);
	max = rd16(cc + CC_QSIZE);
	if (!max)
		return -1;
	if (!size)
		size = max < QSIZE ? max : QSIZE;
	wr16(cc + CC_QSIZE, (u16)size);
	wr16(cc + CC_QMSIX, NO_VECTOR);
	d->noff = rd16(cc + CC_QNOFF);
	wr32(d->mem + AVAIL, 0);
	wr32(d->mem + USED, 0);
	wr64(cc + CC_QDESC, lo + DESC, hi);
	wr64(cc + CC_QDRIVER, lo + AVAIL, hi);
	wr64(cc + CC_QDEVICE, lo + USED, hi);
	wr16(cc + CC_QENABLE, 1);
	d->qsize = size;
	d->avail = d->used = 0;
	return 0;
}

static void driver_ok(struct vdev *d)
{
	wr8(d->common + CC_STATUS, (u8)(status(d) | S_DRIVER_OK));
}

/* The whole well-behaved bring-up with queue d->q. */
static int up(struct vdev *d)
{
	if (begin(d, 1) || queue(d, 0, d->mem, 0))
		return -1;
	driver_ok(d);
	return 0;
}

/* ---- requests --------------------------------------------------------------- */

static void desc(struct vdev *d, u32 i, u32 addr, u32 len, u32 flags, u32 next)
{
	u32 p = d->mem + DESC + 16 * i;

	wr64(p, addr, 0);
	wr32(p + 8, len);
	wr32(p + 12, flags | next << 16);
}

static void notify(struct vdev *d, u32 q)
{
	wr16(d->notify + d->noff * d->mult, (u16)q);
}

/* Offers the chain at `head` and notifies. */
static void submit(struct vdev *d, u32 head)
{
	u32 a = d->mem + AVAIL;

	wr16(a + 4 + 2 * (d->avail % d->qsize), (u16)head);
	__asm__ volatile("" ::: "memory");
	wr16(a + 2, (u16)++d->avail);
	notify(d, d->q);
}

static void fill(u32 addr, u32 bytes, u32 val)
{
	for (u32 i = 0; i < bytes; i += 4)
		wr32(addr + i, val);
}

/*
 * Writes this device's well-behaved request into descriptors 0.. and returns
 * the index of its data descriptor. blk: header, data, status (op and
 * sector as given); rng: one 16-byte writable buffer; transmit queues: one
 * readable buffer.
 */
static u32 request(struct vdev *d, u32 op, u32 sector)
{
	u32 m = d->mem;

	if (d->type == T_BLK) {
		wr32(m + HDR, op);
		wr32(m + HDR + 4, 0);
		wr64(m + HDR + 8, sector, 0);
		wr8(m + STATUS, 0xff);
		desc(d, 0, m + HDR, 16, D_NEXT, 1);
		desc(d, 1, m + DATA, op == BLK_GET_ID ? 20 : 512,
		     D_NEXT | (op == BLK_OUT ? 0 : D_WRITE), 2);
		desc(d, 2, m + STATUS, 1, D_WRITE, 0);
		return 1;
	}
	if (d->type == T_RNG) {
		fill(m + DATA, 16, 0);
		desc(d, 0, m + DATA, 16, D_WRITE, 0);
		return 0;
	}
	/* A console line, an Ethernet broadcast after a zero virtio_net_hdr,
	 * or a vsock RST to the host: all harmless. */
	fill(m + DATA, 128, 0);
	if (d->type == T_CONSOLE) {
		static const char hello[] = "keel-guest: hello from virtio-console\n";

		for (u32 i = 0; i < sizeof(hello) - 1; i++)
			wr8(m + DATA + i, (u8)hello[i]);
		desc(d, 0, m + DATA, sizeof(hello) - 1, 0, 0);
	} else if (d->type == T_NET) {
		fill(m + DATA + 12, 6, ~0u);		 /* destination: broadcast */
		wr32(m + DATA + 18, 0x00005402);	 /* source 02:54:00:00:00:01 */
		wr32(m + DATA + 22, 0xb5880100);	 /* ... ethertype 0x88b5 */
		desc(d, 0, m + DATA, 12 + 60, 0, 0);
	} else {
		wr32(m + DATA, 3);		/* src_cid */
		wr32(m + DATA + 8, 2);		/* dst_cid: the host */
		wr32(m + DATA + 16, 1234);	/* src_port */
		wr32(m + DATA + 20, 1234);	/* dst_port */
		wr32(m + DATA + 28, 3 << 16 | 1); /* type STREAM, op RST */
		desc(d, 0, m + DATA, 44, 0, 0);
	}
	return 0;
}

enum wait { DONE, NEEDS_RESET, NO_ANSWER };

/* Polls the used ring and the status for at most `bound` TSC ticks. */
static enum wait wait_used(struct vdev *d, u64 bound)
{
	u64 start = rdtsc();

	do {
		if (rd16(d->mem + USED + 2) != (u16)d->used) {
			d->used++;
			return DONE;
		}
		if (status(d) & S_NEEDS_RESET)
			return NEEDS_RESET;
	} while (rdtsc() - start < bound);
	return NO_ANSWER;
}

/* The length the device reported for the last used element. */
static u32 used_len(struct vdev *d)
{
	u32 qs = d->qsize ? d->qsize : 1;

	return rd32(d->mem + USED + 4 + 8 * ((d->used - 1) % qs) + 4);
}

/* Waits for the request just offered and classifies the answer. */
static const char *result(struct vdev *d, u64 bound)
{
	switch (wait_used(d, bound)) {
	case NEEDS_RESET:
		return "needs-reset";
	case NO_ANSWER:
		return bound == LONG ? "timeout" : "ignored";
	case DONE:
		break;
	}
	if (d->type == T_BLK)
		return rd8(d->mem + STATUS) ? "error" : "ok";
	if (d->type == T_RNG)
		return used_len(d) ? "ok" : "error";
	return "done";
}

static int good(const char *r)
{
	return r[0] == 'o' || r[0] == 'd'; /* "ok", "done" */
}

/* A rotate-xor checksum of `bytes` at `addr` (tests/src/freestanding.rs
 * computes the same). */
static u32 checksum(u32 addr, u32 bytes)
{
	u32 sum = 0;

	for (u32 i = 0; i < bytes; i += 4)
		sum = (sum << 5 | sum >> 27) ^ rd32(addr + i);
	return sum;
}

/* The pattern written to sector 1: dword i is 0x4b45454c ^ i * 0x9e3779b9. */
static u32 pattern(u32 i)
{
	return 0x4b45454c ^ i * 0x9e3779b9u;
}

/* One well-behaved request on a device already up; for blk a read of
 * sector 0 whose checksum must match `d->sum` once known. */
static const char *well_behaved(struct vdev *d)
{
	const char *r;

	request(d, BLK_IN, 0);
	submit(d, 0);
	r = result(d, LONG);
	if (good(r) && d->type == T_BLK && d->sum && checksum(d->mem + DATA, 512) != d->sum)
		return "broken";
	if (good(r) && d->type == T_RNG && !(rd32(d->mem + DATA) | rd32(d->mem + DATA + 4) |
					     rd32(d->mem + DATA + 8) | rd32(d->mem + DATA + 12)))
		return "broken";
	return r;
}

static void report(const char *kind, struct vdev *d, const char *what, const char *r)
{
	line(kind);
	puts(type_name(d->type));
	putc(*kind == 'V' ? ' ' : '.');
	puts(what);
	putc(' ');
	puts(r);
	putc('\n');
}

/* ---- keel.mode=virtio ---------------------------------------------------- */

static void blk_ops(struct vdev *d)
{
	const char *r;
	u32 m = d->mem;

	line("VIRTIO blk capacity ");
	put_dec(d->devcfg ? rd64(d->devcfg) : 0);
	putc('\n');

	request(d, BLK_IN, 0);
	submit(d, 0);
	r = result(d, LONG);
	if (good(r)) {
		d->sum = checksum(m + DATA, 512);
		line("VIRTIO blk sector0 ");
		put_hex(d->sum);
		putc('\n');
	} else {
		report("VIRTIO ", d, "read", r);
	}

	request(d, BLK_OUT, 1);
	for (u32 i = 0; i < 128; i++)
		wr32(m + DATA + 4 * i, pattern(i));
	submit(d, 0);
	r = result(d, LONG);
	if (good(r)) {
		request(d, BLK_IN, 1);
		desc(d, 1, m + DATA2, 512, D_NEXT | D_WRITE, 2);
		submit(d, 0);
		r = result(d, LONG);
		for (u32 i = 0; good(r) && i < 128; i++)
			if (rd32(m + DATA2 + 4 * i) != pattern(i))
				r = "mismatch";
	}
	report("VIRTIO ", d, "write", r);

	fill(m + DATA, 24, 0);
	request(d, BLK_GET_ID, 0);
	submit(d, 0);
	r = result(d, LONG);
	if (good(r)) {
		line("VIRTIO blk id ");
		for (u32 i = 0; i < 20; i++) {
			u8 ch = rd8(m + DATA + i);

			if (!ch)
				break;
			putc(ch > ' ' && ch < 0x7f ? (char)ch : '?');
		}
		putc('\n');
	} else {
		report("VIRTIO ", d, "id", r);
	}
}

/* The well-behaved requests on every device; returns nothing, reports all. */
static void exercise(struct ctx *c)
{
	for (u32 i = 0; i < c->n; i++) {
		struct vdev *d = &c->dev[i];

		if (up(d)) {
			report("VIRTIO ", d, "init", "failed");
			continue;
		}
		if (d->type == T_BLK) {
			blk_ops(d);
		} else {
			const char *r = well_behaved(d);

			line("VIRTIO ");
			puts(type_name(d->type));
			putc(' ');
			puts(good(r) ? "ok" : r);
			putc('\n');
		}
		reset(d);
	}
}

void virtio_mode(void)
{
	struct ctx c;

	enumerate(&c);
	exercise(&c);
	line("VIRTIO done\n");
}

/* ---- keel.mode=hostile --------------------------------------------------- */

enum attack {
	A_LOOP,
	A_NEXT_OOB,
	A_HEAD_OOB,
	A_ADDR_MMIO,
	A_ADDR_MAX,
	A_LEN_HUGE,
	A_OVERLAP,
	A_WRONG_DIR,
	A_INDIRECT_LEN,
	A_INDIRECT_ZERO,
	A_INDIRECT_HUGE,
	A_INDIRECT_NESTED,
	A_AVAIL_JUMP,
	A_QSIZE_NPOT,
	A_QSIZE_BIG,
	A_QSIZE_ZERO,
	A_QADDR_MMIO,
	A_QADDR_MAX,
	A_NOTIFY_BAD,
	A_LIVE_REQUEUE,
	A_DRIVER_OK_EARLY,
	A_FEATURES_LATE,
	A_STATUS_GAMES,
	A_CFG_GARBAGE,
	A_BAR_GARBAGE,
	/* blk only from here on */
	A_HDR_WRITABLE,
	A_STATUS_LEN0,
	A_STATUS_IN_DATA,
	A_OUT_WRITABLE,
	A_BAD_TYPE,
	A_SECTOR_OOB,
	A_SHORT_DATA,
	A_COUNT,
};

static const char *const attack_names[A_COUNT] = {
	"loop", "next-oob", "head-oob", "addr-mmio", "addr-max", "len-huge", "overlap",
	"wrong-dir", "indirect-len", "indirect-zero", "indirect-huge", "indirect-nested",
	"avail-jump", "qsize-npot", "qsize-big", "qsize-zero", "qaddr-mmio", "qaddr-max",
	"notify-bad", "live-requeue", "driver-ok-early", "features-late", "status-games",
	"cfg-garbage", "bar-garbage", "hdr-writable", "status-len0", "status-in-data",
	"out-writable", "bad-type", "sector-oob", "short-data",
};

static u32 next_rand(struct ctx *c)
{
	u32 x = c->rand;

	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	return c->rand = x;
}

/* Garbage of every width at random offsets of PCI configuration space, the
 * BAR registers and the MSI-X capability included; then what the driver
 * needs is put back. MSI-X is never left enabled unmasked: with garbage in
 * its table it could send the guest an NMI or INIT. */
static void cfg_garbage(struct ctx *c, struct vdev *d)
{
	u32 bdf = d->bdf, cmd = cfg_rd32(bdf, 4) & 0xffff, bars[6];

	for (u32 i = 0; i < 6; i++)
		bars[i] = cfg_rd32(bdf, 0x10 + 4 * i);
	for (u32 i = 0; i < 96; i++) {
		u32 r = next_rand(c), v = next_rand(c), off = r & 0xff, width = 1u << (r >> 8 & 3);

		if (i < 24)
			off = 0x10 + (r & 0x1f); /* the BARs and what follows */
		else if (i < 40 && d->msix)
			off = d->msix + (r & 0xb);
		if (width == 8)
			width = 4;
		if (d->msix && off <= d->msix + 3 && off + width > d->msix + 3)
			v |= 0x40u << (8 * (d->msix + 3 - off)); /* function mask */
		cfg_wr(bdf, off, v, width);
	}
	if (d->msix)
		cfg_wr(bdf, d->msix + 2, 0, 2);
	if (d->pm)
		cfg_wr(bdf, d->pm + 4, 0, 2); /* back to D0 */
	for (u32 i = 0; i < 6; i++)
		cfg_wr(bdf, 0x10 + 4 * i, bars[i], 4);
	cfg_wr(bdf, 4, cmd, 2);
}

/* Garbage at random offsets of each region of the BAR: common and device
 * configuration, ISR, notifications, MSI-X table and PBA. */
static void bar_garbage(struct ctx *c, struct vdev *d)
{
	u32 regions[6] = { d->common, d->devcfg, d->isr, d->notify, d->msix_tbl, d->msix_pba };
	u32 sizes[6] = { CC_LEN, d->devcfg_len, 4, 64, 16 * d->msix_n, 8 };

	for (u32 i = 0; i < 6 * 24; i++) {
		u32 base = regions[i / 24], size = sizes[i / 24] & 0xfff;
		u32 r = next_rand(c), v = next_rand(c), off, width = 1u << (r >> 12 & 3);

		if (!base || !size)
			continue;
		if (width == 8)
			width = 4;
		off = (r & 0xfff) % size;
		if (width == 1)
			wr8(base + off, (u8)v);
		else if (width == 2)
			wr16(base + off, (u16)v);
		else
			wr32(base + off, v);
		rd32(base + (off & ~3u));
	}
	/* Mask every MSI-X entry again; reset puts the rest back. */
	for (u32 i = 0; d->msix_tbl && i < d->msix_n && i < 64; i++)
		wr32(d->msix_tbl + 16 * i + 12, 1);
}

/* Builds the well-behaved request and breaks it as `a` says; returns the
 * head to offer, or -1 when the attack was not a request (result "ok"). */
static int corrupt(struct ctx *c, struct vdev *d, u32 a)
{
	u32 m = d->mem, data = request(d, BLK_IN, 0), dp = m + DESC + 16 * data;
	u32 last = d->type == T_BLK ? 2 : 0, lp = m + DESC + 16 * last;

	switch (a) {
	case A_LOOP:
		wr32(lp + 12, rd32(lp + 12) | D_NEXT); /* next: 0 */
		break;
	case A_NEXT_OOB:
		wr32(lp + 12, rd32(lp + 12) | D_NEXT | d->qsize << 16);
		break;
	case A_HEAD_OOB:
		return d->qsize + 0x1234;
	case A_ADDR_MMIO:
		wr32(dp, 0xd0000000);
		break;
	case A_ADDR_MAX:
		wr64(dp, ~0u, ~0u);
		break;
	case A_LEN_HUGE:
		wr32(dp + 8, ~0u);
		break;
	case A_OVERLAP:
		wr32(dp, m + DESC); /* over the descriptor table itself */
		break;
	case A_WRONG_DIR:
		wr32(dp + 12, rd32(dp + 12) ^ D_WRITE);
		break;
	case A_INDIRECT_LEN:
	case A_INDIRECT_ZERO:
	case A_INDIRECT_HUGE:
	case A_INDIRECT_NESTED:
		/* The request moves to the indirect table; descriptor 4 points
		 * at it with a bad length, or the table points at itself. */
		for (u32 i = 0; i < 48; i += 4)
			wr32(m + INDIR + i, rd32(m + DESC + i));
		desc(d, 4, m + INDIR,
		     a == A_INDIRECT_LEN ? 40 : a == A_INDIRECT_ZERO ? 0 : a == A_INDIRECT_HUGE ? 0xfffffff0 : 48,
		     D_INDIRECT, 0);
		if (a == A_INDIRECT_NESTED)
			wr32(m + INDIR + 12, D_INDIRECT);
		return 4;
	case A_AVAIL_JUMP:
		d->avail += d->qsize + 3;
		break;
	case A_NOTIFY_BAD: {
		u32 cc = d->common, numq = rd16(cc + CC_NUMQ);

		notify(d, numq);
		notify(d, 0x7fff);
		wr16(cc + CC_QSELECT, (u16)numq);
		wr16(cc + CC_QSIZE, 8);
		wr16(cc + CC_QENABLE, 1);
		notify(d, numq);
		wr16(cc + CC_QSELECT, 0xffff);
		wr16(cc + CC_QENABLE, 1);
		break;
	}
	case A_LIVE_REQUEUE:
		wr16(d->common + CC_QSELECT, (u16)d->q);
		wr16(d->common + CC_QSIZE, 2);
		wr64(d->common + CC_QDESC, 0xd0000000, 0);
		wr16(d->common + CC_QENABLE, 0);
		break;
	case A_STATUS_GAMES:
		wr8(d->common + CC_STATUS, S_ACK | S_DRIVER_OK); /* FEATURES_OK dropped */
		wr8(d->common + CC_STATUS, 0xbf);
		break;
	case A_CFG_GARBAGE:
		cfg_garbage(c, d);
		return -1;
	case A_BAR_GARBAGE:
		bar_garbage(c, d);
		return -1;
	case A_HDR_WRITABLE:
		wr32(m + DESC + 12, D_NEXT | D_WRITE | 1 << 16);
		break;
	case A_STATUS_LEN0:
		wr32(m + DESC + 32 + 8, 0);
		break;
	case A_STATUS_IN_DATA:
		wr32(m + DESC + 32, m + DATA + 100);
		break;
	case A_OUT_WRITABLE:
		wr32(m + HDR, BLK_OUT);
		wr32(m + HDR + 8, 1);
		break;
	case A_BAD_TYPE:
		wr32(m + HDR, 0x7fffffff);
		break;
	case A_SECTOR_OOB:
		wr32(m + HDR + 8, ~0u);
		wr32(m + HDR + 12, 0x7fffffff);
		break;
	case A_SHORT_DATA:
		wr32(dp + 8, 100);
		break;
	}
	return 0;
}

/* Runs one attack on a device and reports it. */
static void attack(struct ctx *c, struct vdev *d, u32 a)
{
	const char *r = "ignored";
	int head, err = 0;

	/* Bring-up, broken where the attack is in the registers. */
	switch (a) {
	case A_QSIZE_NPOT:
	case A_QSIZE_BIG:
	case A_QSIZE_ZERO: {
		u32 max;

		err = begin(d, 1);
		wr16(d->common + CC_QSELECT, (u16)d->q);
		max = rd16(d->common + CC_QSIZE);
		/* 0x10000 is written as 0. */
		err |= queue(d, a == A_QSIZE_NPOT ? 3 : a == A_QSIZE_ZERO ? 0x10000 : max < 0x8000 ? max * 2 : 0xffff,
			     d->mem, 0);
		break;
	}
	case A_QADDR_MMIO:
	case A_QADDR_MAX:
		err = begin(d, 1) || queue(d, 0, a == A_QADDR_MMIO ? 0xd0000000 : 0xffffc000,
					  a == A_QADDR_MMIO ? 0 : ~0u);
		break;
	case A_DRIVER_OK_EARLY:
		err = begin(d, 0) || queue(d, 0, d->mem, 0);
		break;
	case A_FEATURES_LATE:
		err = begin(d, 1);
		wr32(d->common + CC_GFSELECT, 0);
		wr32(d->common + CC_GF, ~0u);
		wr32(d->common + CC_GFSELECT, 1);
		wr32(d->common + CC_GF, ~0u);
		err |= queue(d, 0, d->mem, 0);
		break;
	default:
		err = begin(d, 1) || queue(d, 0, d->mem, 0);
	}
	if (err) {
		r = status(d) & S_NEEDS_RESET ? "needs-reset" : "error";
	} else {
		driver_ok(d);
		head = corrupt(c, d, a);
		if (head < 0) {
			r = "ok";
		} else {
			submit(d, (u32)head);
			r = result(d, SHORT);
		}
	}
	/* Whatever happened, a reset must bring the device back. */
	if (up(d)) {
		r = "timeout";
	} else {
		const char *w = well_behaved(d);

		if (!good(w))
			r = *w == 't' ? "timeout" : "broken";
	}
	report("HOSTILE ", d, attack_names[a], r);
}

void hostile_mode(void)
{
	struct ctx c;

	enumerate(&c);
	exercise(&c);
	for (u32 i = 0; i < c.n; i++) {
		struct vdev *d = &c.dev[i];

		for (u32 a = 0; a < A_COUNT; a++)
			if (a < A_HDR_WRITABLE || d->type == T_BLK)
				attack(&c, d, a);
		reset(d);
	}
	/* After all that, every device still serves well-behaved requests. */
	for (u32 i = 0; i < c.n; i++) {
		struct vdev *d = &c.dev[i];
		const char *r = up(d) ? "timeout" : well_behaved(d);

		report("HOSTILE ", d, "final", r);
		reset(d);
	}
	line("HOSTILE done\n");
}
