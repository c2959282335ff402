/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What the parts of Keel's freestanding test guest share: fixed-width types,
 * port and memory accessors, the TSC, and the COM1 report helpers (guest.c).
 */
#ifndef KEEL_GUEST_H
#define KEEL_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

static inline void outb(u16 port, u8 val)
{
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline void outw(u16 port, u16 val)
{
	__asm__ volatile("outw %0, %1" : : "a"(val), "Nd"(port));
}

static inline void outl(u16 port, u32 val)
{
	__asm__ volatile("outl %0, %1" : : "a"(val), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 val;

	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline u16 inw(u16 port)
{
	u16 val;

	__asm__ volatile("inw %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline u32 inl(u16 port)
{
	u32 val;

	__asm__ volatile("inl %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline u8 rd8(u32 addr)
{
	return *(const volatile u8 *)addr;
}

static inline u16 rd16(u32 addr)
{
	return *(const volatile u16 *)addr;
}

static inline u32 rd32(u32 addr)
{
	return *(const volatile u32 *)addr;
}

static inline u64 rd64(u32 addr)
{
	return *(const volatile u64 *)addr;
}

static inline void wr8(u32 addr, u8 val)
{
	*(volatile u8 *)addr = val;
}

static inline void wr16(u32 addr, u16 val)
{
	*(volatile u16 *)addr = val;
}

static inline void wr32(u32 addr, u32 val)
{
	*(volatile u32 *)addr = val;
}

static inline u64 rdtsc(void)
{
	u64 tsc;

	__asm__ volatile("rdtsc" : "=A"(tsc));
	return tsc;
}

/* Report helpers, in guest.c. */
void putc(char c);
void puts(const char *s);
void line(const char *what);
void put_hex(u64 v);
void put_dec(u64 v);

/* The virtio-pci driver's two modes, in virtio.c: both report and return;
 * the caller powers off. */
void virtio_mode(void);
void hostile_mode(void);

#endif
