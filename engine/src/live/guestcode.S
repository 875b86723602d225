/*
 * The tiny guest: a 64 KiB firmware image that QEMU boots with -bios, and whose guest part
 * pagewire's tiny VMM (tinyguest.rs) loads at CODE_RAM and starts in flat 32-bit mode. The
 * bytes in guestcode.rs are this file assembled (the test `firmware_matches_its_source`
 * reassembles it):
 *
 *     as --32 -o guestcode.o guestcode.S
 *     ld -m elf_i386 -Ttext=0 --oformat binary -o guestcode.bin guestcode.o
 *
 * Each LAPIC timer tick (1 ms) the guest stores its progress counter into the next BURST
 * pages of its working set and halts again. The tick handler never returns with iret: it
 * drops its frame and runs the burst, since the only interrupted code is the hlt (and some
 * nested KVMs emulate real- and protected-mode guests without a protected-mode iret). Under a
 * VMM with no in-kernel LAPIC, the LAPIC writes exit as MMIO and are ignored, and the VMM
 * resumes the halted vCPU at each tick itself: the same code paces itself either way.
 */
        .set PARAMS_RAM, 0x500
        .set BURST, 0x500
        .set WS_FIRST, 0x504
        .set WS_END, 0x508
        .set NEXT, 0x50c
        .set COUNTER, 0x510
        .set TIMER_COUNT, 0x514
        .set IDTR, 0x5f0
        .set GDT, 0x5c0
        .set GDTR, 0x5e0
        .set IDT, 0x800
        .set CODE_RAM, 0x1000
        .set STACK_TOP, 0x9000
        .set ROM, 0xffff0000
        .set LAPIC, 0xfee00000

        .text
        .globl _start
_start:
params:                         /* copied to PARAMS_RAM; the VMM patches them */
        .long 1                 /* burst: pages per tick */
        .long 0x100000          /* first page of the working set */
        .long 0x200000          /* end of the working set */
        .long 0x100000          /* next page to write */
        .long 0                 /* progress counter */
        .long 1000000           /* LAPIC timer count per tick (1 ns each under KVM) */
        .long 0, 0

        .org 0x100
        .code32
guest:                          /* copied to CODE_RAM and run there */
        movl $0, GDT                    /* the GDT in RAM: iret reads it */
        movl $0, GDT + 4
        movl $0x0000ffff, GDT + 8       /* 0x08: code, flat, 32-bit */
        movl $0x00cf9b00, GDT + 12
        movl $0x0000ffff, GDT + 16      /* 0x10: data, flat, 32-bit */
        movl $0x00cf9300, GDT + 20
        movw $23, GDTR
        movl $GDT, GDTR + 2
        lgdt GDTR
        mov $IDT, %edi
        mov $256, %ecx
        mov $(CODE_RAM + handler - guest), %eax
1:      mov %ax, (%edi)
        movw $0x08, 2(%edi)
        movw $0x8e00, 4(%edi)
        movw $0, 6(%edi)
        add $8, %edi
        loop 1b
        movw $0x7ff, IDTR
        movl $IDT, IDTR + 2
        lidt IDTR
        movl $0x1ff, LAPIC + 0xf0       /* software enable, spurious vector 0xff */
        movl $0xb, LAPIC + 0x3e0        /* divide by 1 */
        movl $0x20020, LAPIC + 0x320    /* periodic, vector 0x20 */
        mov TIMER_COUNT, %eax
        mov %eax, LAPIC + 0x380
top:
        sti
        hlt                             /* until the next tick */
        cli
burst:
        mov BURST, %ecx
        mov NEXT, %edi
body:
        incl COUNTER
        mov COUNTER, %eax
        mov %eax, (%edi)                /* dirty the page */
        add $4096, %edi
        cmp WS_END, %edi
        jb 2f
        mov WS_FIRST, %edi              /* wrap */
2:      loop body
        mov %edi, NEXT
        jmp top
handler:                                /* the tick woke the hlt: no iret */
        movl $0, LAPIC + 0xb0           /* end of interrupt */
        mov $STACK_TOP, %esp            /* drop the interrupt frame */
        jmp burst
guest_end:

        .org 0xfe00
gdt:
        .quad 0
        .quad 0x00cf9b000000ffff        /* 0x08: code, flat, 32-bit */
        .quad 0x00cf93000000ffff        /* 0x10: data, flat, 32-bit */
gdtr:
        .word gdtr - gdt - 1
        .long ROM + gdt

        .org 0xff00
        .code16
real:
        cli
        cld
        lgdtl %cs:gdtr
        mov %cr0, %eax
        or $1, %al
        mov %eax, %cr0
        ljmpl $0x08, $(ROM + protected)
        .code32
protected:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov %ax, %fs
        mov %ax, %gs
        mov $(ROM + params), %esi
        mov $PARAMS_RAM, %edi
        mov $8, %ecx
        rep movsl
        mov $(ROM + guest), %esi
        mov $CODE_RAM, %edi
        mov $((guest_end - guest + 3) / 4), %ecx
        rep movsl
        mov $STACK_TOP, %esp
        mov $CODE_RAM, %eax
        jmp *%eax

        .org 0xfff0
        .code16
reset:
        jmp real
        .org 0x10000
