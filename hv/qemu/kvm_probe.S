/*
 * The guest the KVM probe boots (hv/qemu/accel.py embeds its bytes; a test rebuilds them from
 * this file and compares). A multiboot kernel in the "a.out kludge" form, so it is a flat binary
 * that QEMU's -kernel loader takes as it is, with no ELF headers.
 *
 * It does what a stock kernel does early and a broken or emulating KVM fails at: it switches from
 * 32-bit protected mode to 64-bit long mode (PAE paging, EFER.LME, a 64-bit code segment), writes
 * to 6144 pages of memory (4..28 MiB), and runs a 20-million-iteration loop that takes a few ms at
 * hardware speed but seconds when KVM emulates the guest instruction by instruction. Only then
 * does it print the marker on COM1. The probe gives it a short deadline.
 *
 * Build: as --32 -o kvm_probe.o kvm_probe.S &&
 *        ld -m elf_i386 -Ttext=0x100000 --oformat=binary -e _start -o kvm_probe.bin kvm_probe.o
 */
    .set LOAD_ADDR, 0x100000
    .set PML4, 0x101000                 /* page tables just above the (tiny) image */
    .set PDPT, 0x102000
    .set PD, 0x103000
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00010000           /* bit 16: the load addresses below are valid */

    .code32
    .text
    .globl _start
header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long header                        /* header_addr */
    .long LOAD_ADDR                     /* load_addr */
    .long 0                             /* load_end_addr: the whole file */
    .long 0                             /* bss_end_addr: none */
    .long _start                        /* entry_addr */

_start:
    cli
    mov $PML4, %edi                     /* zero the three tables */
    xor %eax, %eax
    mov $(3 * 1024), %ecx
    rep stosl
    movl $(PDPT + 3), PML4              /* present | writable */
    movl $(PD + 3), PDPT
    mov $PD, %edi                       /* identity-map the first 32 MiB with 2 MiB pages */
    mov $0x83, %eax                     /* present | writable | large */
    mov $16, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    mov $PML4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                      /* CR4.PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx               /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                /* CR0.PG | CR0.PE */
    mov %eax, %cr0
    lgdt gdt_descriptor
    ljmp $0x08, $long_mode

    .code64
long_mode:
    mov $0x400000, %edi                 /* touch 4..28 MiB, one write per 4 KiB page */
2:  mov %edi, (%rdi)
    add $0x1000, %edi
    cmp $0x1c00000, %edi
    jb 2b
    mov $20000000, %ecx
3:  dec %ecx
    jnz 3b
    lea marker(%rip), %rsi
    mov $0x3f8, %dx
4:  lodsb
    test %al, %al
    jz 5f
    out %al, %dx
    jmp 4b
5:  hlt
    jmp 5b

marker:
    .asciz "FV-KVM-PROBE-OK\n"
    .p2align 3
gdt:
    .quad 0
    .quad 0x00209a0000000000            /* 0x08: 64-bit code */
gdt_descriptor:
    .word gdt_descriptor - gdt - 1
    .long gdt
