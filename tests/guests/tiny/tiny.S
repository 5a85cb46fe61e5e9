/*
 * Fleetvisor's tiny test guest: a multiboot (v1) kernel for QEMU's -kernel loader.
 *
 * It runs in 32-bit protected mode without paging and does four things:
 *   1. prints "READY" on COM1 at once (the start benchmark times this line);
 *   2. reads dirty_mib_s=N from the multiboot command line (QEMU's -append) and echoes it;
 *   3. sleeps in HLT between ticks of the PIT at 100 Hz, so an idle guest costs the host
 *      almost nothing even under TCG, and the PIT follows QEMU's virtual clock, so a paused
 *      VM stops counting;
 *   4. on every tick dirties N*256/100 pages (one dword per 4 KiB page, a new value each
 *      time) in the memory above 4 MiB, cycling through it, and every 100 ticks (one second)
 *      prints "count=K";
 *   5. with reset_after_s=S on the command line, prints "RESETTING" after S seconds and resets
 *      itself with a triple fault, the way a crashed kernel does (QEMU reports a guest reset).
 *
 * Build (scripts/build-guests does this):
 *   as --32 -o tiny.o tiny.S && ld -m elf_i386 -Ttext 0x100000 -o tiny.elf tiny.o
 */

    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000002           /* bit 1: pass the memory size (mem_upper) */
    .set COM1, 0x3f8
    .set TICKS_PER_S, 100
    .set PIT_DIVISOR, 11932             /* 1193182 Hz / 100 Hz */
    .set DIRTY_BASE, 0x400000           /* 4 MiB: above this image, its stack and the boot info */
    .set PAGES_PER_MIB, 256

    .section .text
    .align 4
multiboot_header:                       /* QEMU looks for it in the first 8 KiB of the file */
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .globl _start
_start:
    cli
    mov $stack_top, %esp
    mov %ebx, boot_info                 /* the loader's multiboot information structure */
    mov $msg_ready, %esi                /* first thing: the ready marker */
    call puts

    /* The multiboot spec leaves GDTR undefined: load our own flat segments before any IRQ. */
    lgdt gdt_descriptor
    ljmp $0x08, $reload_segments
reload_segments:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss

    mov $key_dirty, %edi
    call cmdline_value
    cmp $100000, %eax                   /* VmWorkload's limit */
    jbe 21f
    mov $100000, %eax
21: mov %eax, dirty_mib_s
    mov $key_reset, %edi
    call cmdline_value
    mov %eax, reset_after_s
    call find_memory_end                /* -> dirty_end */
    mov $msg_rate, %esi
    call puts
    mov dirty_mib_s, %eax
    call put_decimal
    mov $'\n', %al
    call putc

    call setup_idt
    call setup_pic
    call setup_local_apic
    call setup_pit

main_loop:
    sti                                 /* STI takes effect after HLT starts: no lost wake-up */
    hlt
    cli
1:  mov seen_ticks, %eax
    cmp ticks, %eax
    je main_loop
    inc %eax
    mov %eax, seen_ticks
    call dirty_some_pages
    mov seen_ticks, %eax
    xor %edx, %edx
    mov $TICKS_PER_S, %ecx
    div %ecx
    test %edx, %edx
    jnz 1b
    incl seconds                        /* one more second of guest time: print the counter */
    mov $msg_count, %esi
    call puts
    mov seconds, %eax
    call put_decimal
    mov $'\n', %al
    call putc
    mov reset_after_s, %eax
    test %eax, %eax
    jz 1b
    cmp seconds, %eax
    jne 1b
    mov $msg_reset, %esi
    call puts
    lidt null_idt_descriptor            /* no IDT at all: the next interrupt is a triple fault */
    int3

/* Dirty dirty_mib_s * 256 / 100 pages per tick; the remainder carries over to the next tick. */
dirty_some_pages:
    mov dirty_mib_s, %eax
    imul $PAGES_PER_MIB, %eax
    add page_credit, %eax
    xor %edx, %edx
    mov $TICKS_PER_S, %ecx
    div %ecx                            /* eax = pages now, edx = credit left */
    mov %edx, page_credit
    mov %eax, %ecx
    mov dirty_cursor, %edi
    mov seen_ticks, %edx                /* a new value each pass, so every write changes the page */
2:  test %ecx, %ecx
    jz 3f
    cmp dirty_end, %edi
    jb 4f
    mov $DIRTY_BASE, %edi
    cmp dirty_end, %edi                 /* no memory to dirty at all: give up quietly */
    jae 3f
4:  mov %edx, (%edi)
    add $4096, %edi
    dec %ecx
    jmp 2b
3:  mov %edi, dirty_cursor
    ret

/*
 * eax = the decimal after the key at edi (e.g. "dirty_mib_s=") at the start of a word of the
 * multiboot command line; 0 when the key is absent. Values stop growing at 1000000.
 */
cmdline_value:
    push %ebx
    push %esi
    push %ebp
    mov %edi, %ebx                      /* the key */
    xor %eax, %eax
    mov boot_info, %ecx
    testl $4, (%ecx)                    /* flags bit 2: cmdline is valid */
    jz 9f
    mov 16(%ecx), %esi
    mov %esi, %ebp                      /* start of the string, for the word-boundary test */
5:  cmp %ebp, %esi
    je 6f
    cmpb $' ', -1(%esi)
    jne 8f
6:  mov %ebx, %edi
    mov %esi, %edx
7:  mov (%edi), %al
    test %al, %al
    jz 10f                              /* the whole key matched */
    cmp (%edx), %al
    jne 8f
    inc %edi
    inc %edx
    jmp 7b
8:  xor %eax, %eax
    cmpb $0, (%esi)
    je 9f
    inc %esi
    jmp 5b
10: xor %eax, %eax
11: movzbl (%edx), %ecx
    sub $'0', %ecx
    cmp $9, %ecx
    ja 9f
    cmp $1000000, %eax
    jae 9f
    imul $10, %eax
    add %ecx, %eax
    inc %edx
    jmp 11b
9:  pop %ebp
    pop %esi
    pop %ebx
    ret

/* dirty_end = the end of RAM above 1 MiB (mem_upper is in KiB), rounded down to a page. */
find_memory_end:
    mov boot_info, %ebx
    mov $DIRTY_BASE, %eax
    testl $1, (%ebx)                    /* flags bit 0: mem_lower/mem_upper are valid */
    jz 14f
    mov 8(%ebx), %eax
    shl $10, %eax
    add $0x100000, %eax
    and $0xfffff000, %eax
14: mov %eax, dirty_end
    movl $DIRTY_BASE, dirty_cursor
    ret

/* Interrupt gates: 0-31 (CPU exceptions) -> fault, 32 (IRQ0) -> tick, 33-47 -> ignore. */
setup_idt:
    xor %ecx, %ecx
15: mov $fault, %eax
    cmp $32, %ecx
    jb 16f
    mov $irq_ignore, %eax
    cmp $32, %ecx
    jne 16f
    mov $irq_tick, %eax
16: lea idt(,%ecx,8), %edi
    mov %ax, (%edi)                     /* offset 15..0 */
    movw $0x08, 2(%edi)                 /* code segment */
    movw $0x8e00, 4(%edi)               /* present, ring 0, 32-bit interrupt gate */
    shr $16, %eax
    mov %ax, 6(%edi)                    /* offset 31..16 */
    inc %ecx
    cmp $48, %ecx
    jb 15b
    lidt idt_descriptor
    ret

/* Move the PIC's IRQs to vectors 32-47 (away from the CPU exceptions); unmask only IRQ0. */
setup_pic:
    mov $0x11, %al                      /* ICW1: initialise, ICW4 follows */
    out %al, $0x20
    out %al, $0xa0
    mov $0x20, %al                      /* ICW2: vector offsets */
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xa1
    mov $0x04, %al                      /* ICW3: slave on IRQ2 */
    out %al, $0x21
    mov $0x02, %al
    out %al, $0xa1
    mov $0x01, %al                      /* ICW4: 8086 mode */
    out %al, $0x21
    out %al, $0xa1
    mov $0xfe, %al                      /* masks: IRQ0 only */
    out %al, $0x21
    mov $0xff, %al
    out %al, $0xa1
    ret

/*
 * Route the PIC to the CPU through the local APIC ("virtual wire" mode): LINT0 delivers ExtINT,
 * LINT1 NMI. SeaBIOS (pc, q35) does this for us but qboot (microvm) does not. Without paging the
 * APIC's registers are at their physical address; on a CPU without an APIC the writes go nowhere.
 */
setup_local_apic:
    orl $0x100, 0xfee000f0              /* spurious-vector register: APIC software enable */
    movl $0x700, 0xfee00350             /* LVT LINT0: ExtINT, unmasked */
    movl $0x400, 0xfee00360             /* LVT LINT1: NMI */
    ret

/* PIT channel 0, mode 2 (rate generator), at TICKS_PER_S. */
setup_pit:
    mov $0x34, %al
    out %al, $0x43
    mov $(PIT_DIVISOR & 0xff), %al
    out %al, $0x40
    mov $(PIT_DIVISOR >> 8), %al
    out %al, $0x40
    ret

irq_tick:
    push %eax
    incl ticks
    mov $0x20, %al                      /* end of interrupt */
    out %al, $0x20
    pop %eax
irq_ignore:
    iret

fault:                                  /* a CPU exception: say so and stop (QEMU keeps running) */
    cli
    mov $msg_fault, %esi
    call puts
17: hlt
    jmp 17b

/* Print the NUL-terminated string at esi. */
puts:
    lodsb
    test %al, %al
    jz 18f
    call putc
    jmp puts
18: ret

/* Print al on COM1, after the transmitter has room (LSR bit 5). */
putc:
    push %edx
    push %eax
    mov $(COM1 + 5), %dx
19: in %dx, %al
    test $0x20, %al
    jz 19b
    pop %eax
    mov $COM1, %dx
    out %al, %dx
    pop %edx
    ret

/* Print eax in decimal. */
put_decimal:
    mov $digits_end, %edi
    mov $10, %ecx
20: xor %edx, %edx
    div %ecx
    add $'0', %dl
    dec %edi
    mov %dl, (%edi)
    test %eax, %eax
    jnz 20b
    mov %edi, %esi
    jmp puts

    .section .data
    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: flat 32-bit data */
gdt_descriptor:
    .word gdt_descriptor - gdt - 1
    .long gdt
idt_descriptor:
    .word 48 * 8 - 1
    .long idt
null_idt_descriptor:
    .word 0
    .long 0
msg_ready:  .asciz "READY\n"
msg_rate:   .asciz "dirty_mib_s="
msg_count:  .asciz "count="
msg_fault:  .asciz "FAULT\n"
key_dirty:  .asciz "dirty_mib_s="
key_reset:  .asciz "reset_after_s="
msg_reset:  .asciz "RESETTING\n"
digits:     .space 11
digits_end: .byte 0

    .section .bss
    .align 16
idt:          .space 48 * 8
boot_info:    .long 0
dirty_mib_s:  .long 0
dirty_end:    .long 0
dirty_cursor: .long 0
page_credit:  .long 0
ticks:        .long 0
seen_ticks:   .long 0
seconds:      .long 0
reset_after_s: .long 0
    .align 16
stack:        .space 16384
stack_top:
