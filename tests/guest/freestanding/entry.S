/* SPDX-License-Identifier: Apache-2.0 */
/*
 * PVH entry point of Keel's freestanding test guest.
 *
 * The VMM enters here in 32-bit protected mode with paging off, flat
 * segments and EBX = physical address of struct hvm_start_info. There
 * is no stack.
 *
 * The ready marker goes out before anything else, from immediates only:
 * on a host whose KVM emulates every guest memory access (kvm_pvm) each
 * load or store costs microseconds, so nothing here touches memory.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define COM1 0x3f8

	/* The PVH note: name "Xen", type PHYS32_ENTRY, desc = entry address. */
	.section .note.Xen, "a"
	.p2align 2
	.long 4				/* namesz */
	.long 4				/* descsz */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.long _start

/* One byte to COM1: AL is the data register, DX holds the port. */
.macro putc c
	movb $\c, %al
	outb %al, %dx
.endm

	.section .text.entry, "ax"
	.code32
	.globl _start
	.type _start, @function
_start:
	movl $stack_top, %esp
	movw $COM1, %dx
	/* "KEEL-GUEST READY\n" */
	putc 0x4b
	putc 0x45
	putc 0x45
	putc 0x4c
	putc 0x2d
	putc 0x47
	putc 0x55
	putc 0x45
	putc 0x53
	putc 0x54
	putc 0x20
	putc 0x52
	putc 0x45
	putc 0x41
	putc 0x44
	putc 0x59
	putc 0x0a
	/* keel_main(start_info) never returns; regparm passes it in EAX. */
	movl %ebx, %eax
	jmp keel_main
	.size _start, . - _start

	.section .bss
	.p2align 4
stack_bottom:
	.skip 8192
stack_top:

	.section .note.GNU-stack, "", @progbits
