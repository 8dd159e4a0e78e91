//! The native bf16 kernels' own machine code, run on a CPU without their instructions: each
//! AMX or AVX512-BF16 instruction raises #UD (SIGILL), and a signal handler decodes and
//! emulates it on the interrupted thread's state, then resumes after it. So the `asm!` of
//! [`super::amx`] (its encodings as the assembler wrote them, the operand roles of
//! `tdpbf16ps`, the strides, the loop's address arithmetic and the 64-byte tile
//! configuration) and the compiled `vdpbf16ps` kernel execute on every CPU with AVX-512F, not
//! only where AMX or AVX512-BF16 exist.
//!
//! Only the instructions these kernels emit are decoded (Intel SDM vol. 2; encodings checked
//! against objdump's disassembly of the kernels):
//! - AMX, VEX.128.0F38.W0 opcodes 49, 4B and 5C: `ldtilecfg`, `tilerelease`, `tilezero`,
//!   `tileloadd`, `tilestored` and `tdpbf16ps`, on a software tile state kept per thread, as
//!   on hardware. Their semantics follow the SDM's pseudo-code: configured rows × bytes per
//!   row, `stride = index << scale`, a load zeroing what it does not write, and
//!   `tdpbf16ps`'s shape rules (a violation, #UD on hardware, is recorded as an error).
//! - `vdpbf16ps zmm, zmm, zmm` (EVEX.512.F3.0F38.W0 52, register form, no mask: all the
//!   12×32 kernel emits), on the zmm registers saved in the signal frame's XSAVE area (at
//!   the offsets CPUID leaf 0xD gives) and restored from it on return.
//!
//! The dot products add the pairs' products in the order of the plain-Rust stand-ins, so
//! results equal the emulated blockings bit for bit; hardware may round its sums otherwise,
//! which is why the native tests compare on exact integers.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::super::tests::check_tiling;
use super::super::{Tiling, emulated_amx_tiling};
use super::tests::check_amx_kernel;
use crate::backbone::arch::Arch;
use crate::backbone::fast::tests::{images, synthetic};
use crate::backbone::fast::{Algorithm, FastResNet, Precision};
use crate::isa::{AmxBf16, Avx512Bf16, Isa, IsaKind};

/// One thread's software tile state: the palette-1 configuration of tmm0–7 and their rows.
struct Tiles {
    palette: u8,
    rows: [usize; 8],
    colsb: [usize; 8],
    data: [[u8; 1024]; 8],
}

thread_local! {
    /// Tile state is per thread, as on hardware: the worker threads of a convolution each
    /// configure and use their own. A const-initialised thread-local without a destructor,
    /// so the signal handler may touch it.
    static TILES: UnsafeCell<Tiles> = const {
        UnsafeCell::new(Tiles { palette: 0, rows: [0; 8], colsb: [0; 8], data: [[0; 1024]; 8] })
    };
}

/// Instructions emulated, over all threads, by kind: ldtilecfg, tilerelease, tilezero,
/// tileloadd, tilestored, tdpbf16ps, vdpbf16ps.
static COUNTS: [AtomicUsize; 7] = [const { AtomicUsize::new(0) }; 7];
/// Offsets in the standard-format XSAVE area of the YMM_Hi128, ZMM_Hi256 and Hi16_ZMM
/// components (CPUID leaf 0xD, sub-leaves 2, 6 and 7), read before the handler goes in.
static XSAVE_OFFSETS: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];
/// The first problem met (1 + an index into [`PROBLEMS`]; 0: none).
static PROBLEM: AtomicUsize = AtomicUsize::new(0);
const PROBLEMS: [&str; 6] = [
    "ldtilecfg: not palette 1 with start_row 0 and zero reserved bytes",
    "ldtilecfg: a tile beyond 16 rows of 64 bytes",
    "an AMX instruction on an unconfigured tile",
    "tdpbf16ps: tile shapes that do not multiply (#UD on hardware)",
    "a SIGILL that is none of the instructions emulated here",
    "a signal frame without the XSAVE extended state",
];
/// One test at a time installs the handler and uses the tile state.
static LOCK: Mutex<()> = Mutex::new(());

fn problem(i: usize) {
    let _ = PROBLEM.compare_exchange(0, i + 1, Ordering::Relaxed, Ordering::Relaxed);
}

/// ucontext general-register slots of the x86 register numbers 0–15 (rax, rcx, rdx, rbx,
/// rsp, rbp, rsi, rdi, r8–r15).
const GREGS: [libc::c_int; 16] = [
    libc::REG_RAX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RBX,
    libc::REG_RSP,
    libc::REG_RBP,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
];

/// The interrupted thread's general registers, as ucontext holds them.
type Gregs = [libc::greg_t; 23];

/// A memory operand: its address (base + displacement), the stride (index << scale, 0
/// without an index) and the instruction's length.
struct Mem {
    addr: usize,
    stride: usize,
    len: usize,
}

/// Decodes the ModRM memory operand at `ip[4..]` (no RIP-relative form: the kernel uses
/// registers only).
///
/// # Safety
/// `ip` points at a whole instruction.
unsafe fn memory(ip: *const u8, gregs: &Gregs, x: u8, b: u8) -> Option<Mem> {
    // SAFETY: the operand bytes are part of the instruction (see the contract).
    let byte = |i: usize| unsafe { *ip.add(i) };
    let reg = |n: u8| gregs[GREGS[usize::from(n)] as usize] as usize;
    let modrm = byte(4);
    let (md, rm) = (modrm >> 6, modrm & 7);
    let (base, index, mut len) = if rm == 4 {
        let sib = byte(5);
        let (scale, idx, bs) = (sib >> 6, (sib >> 3) & 7 | x << 3, sib & 7);
        let index = (idx != 4).then(|| reg(idx) << scale);
        let base = if bs == 5 && md == 0 {
            None
        } else {
            Some(reg(bs | b << 3))
        };
        (base, index, 6)
    } else if rm == 5 && md == 0 {
        return None;
    } else {
        (Some(reg(rm | b << 3)), None, 5)
    };
    let disp = match (md, base) {
        (1, _) => {
            len += 1;
            byte(len - 1) as i8 as isize
        }
        (2, _) | (0, None) => {
            len += 4;
            i32::from_le_bytes([byte(len - 4), byte(len - 3), byte(len - 2), byte(len - 1)])
                as isize
        }
        _ => 0,
    };
    Some(Mem {
        addr: base.unwrap_or(0usize).wrapping_add_signed(disp),
        stride: index.unwrap_or(0),
        len,
    })
}

/// Emulates the instruction at `ip` if it is one of the six; returns its length.
///
/// # Safety
/// `ip` points at the faulting instruction, and the memory operands of a tile load or store
/// are valid for the configured rows × bytes (the kernel's contract).
unsafe fn emulate(ip: *const u8, gregs: &Gregs, t: &mut Tiles) -> Option<usize> {
    // SAFETY: a VEX instruction is at least 5 bytes; the caller's contract.
    let byte = |i: usize| unsafe { *ip.add(i) };
    // 3-byte VEX (C4), map 0F38, W0, L0; the first byte is read alone, as another
    // instruction may be shorter.
    if byte(0) != 0xC4 {
        return None;
    }
    let (p1, p2) = (byte(1), byte(2));
    if p1 & 0x1F != 2 || p2 & 0x84 != 0 {
        return None;
    }
    let (r, x, b) = ((!p1 >> 7) & 1, (!p1 >> 6) & 1, (!p1 >> 5) & 1);
    let (vvvv, pp) = (usize::from((!p2 >> 3) & 0xF), p2 & 3);
    let (op, modrm) = (byte(3), byte(4));
    let reg = usize::from((modrm >> 3) & 7 | r << 3);
    let rm = usize::from(modrm & 7 | b << 3);
    let registers = modrm >> 6 == 3;
    let usable = |t: &Tiles, i: usize| i < 8 && t.palette == 1 && t.rows[i] > 0;
    // pp: 0 none, 1 66, 2 F3, 3 F2.
    match (op, pp, registers) {
        (0x49, 0, false) => {
            // SAFETY: as for `emulate`.
            let m = unsafe { memory(ip, gregs, x, b)? };
            // SAFETY: ldtilecfg reads 64 bytes at its operand (the TileSession's config).
            let cfg = unsafe { std::slice::from_raw_parts(m.addr as *const u8, 64) };
            *t = Tiles {
                palette: cfg[0],
                rows: std::array::from_fn(|i| usize::from(cfg[48 + i])),
                colsb: std::array::from_fn(|i| {
                    usize::from(u16::from_le_bytes([cfg[16 + 2 * i], cfg[17 + 2 * i]]))
                }),
                data: [[0; 1024]; 8],
            };
            if t.palette != 1 || cfg[1] != 0 || cfg[2..16].iter().any(|&c| c != 0) {
                problem(0);
            }
            if (0..8).any(|i| t.rows[i] > 16 || t.colsb[i] > 64 || !t.colsb[i].is_multiple_of(4)) {
                problem(1);
            }
            COUNTS[0].fetch_add(1, Ordering::Relaxed);
            Some(m.len)
        }
        (0x49, 0, true) if modrm == 0xC0 => {
            t.palette = 0;
            t.rows = [0; 8];
            t.colsb = [0; 8];
            t.data = [[0; 1024]; 8];
            COUNTS[1].fetch_add(1, Ordering::Relaxed);
            Some(5)
        }
        (0x49, 3, true) => {
            if !usable(t, reg) {
                problem(2);
            }
            t.data[reg & 7] = [0; 1024];
            COUNTS[2].fetch_add(1, Ordering::Relaxed);
            Some(5)
        }
        (0x4B, 3 | 2, false) => {
            // SAFETY: as for `emulate`.
            let m = unsafe { memory(ip, gregs, x, b)? };
            if !usable(t, reg) {
                problem(2);
                return Some(m.len);
            }
            let (rows, colsb) = (t.rows[reg], t.colsb[reg]);
            let tile = &mut t.data[reg];
            if pp == 3 {
                // A load zeroes what it does not write: bytes past `colsb`, rows past `rows`.
                *tile = [0; 1024];
            }
            for row in 0..rows {
                let at = m.addr.wrapping_add(row * m.stride) as *mut u8;
                let line = &mut tile[row * 64..row * 64 + colsb];
                // SAFETY: the kernel's contract: each configured row lies in its buffer.
                unsafe {
                    if pp == 3 {
                        line.copy_from_slice(std::slice::from_raw_parts(at, colsb));
                    } else {
                        std::slice::from_raw_parts_mut(at, colsb).copy_from_slice(line);
                    }
                }
            }
            COUNTS[if pp == 3 { 3 } else { 4 }].fetch_add(1, Ordering::Relaxed);
            Some(m.len)
        }
        (0x5C, 2, true) => {
            let (dst, a, bt) = (reg, rm, vvvv);
            if ![dst, a, bt].iter().all(|&i| usable(t, i)) {
                problem(2);
                return Some(5);
            }
            let (m_rows, n, k) = (t.rows[dst], t.colsb[dst] / 4, t.colsb[a] / 4);
            if t.rows[a] != m_rows || t.colsb[bt] / 4 != n || t.rows[bt] != k {
                problem(3);
                return Some(5);
            }
            let word = |tile: &[u8; 1024], row: usize, col: usize| {
                let at = row * 64 + col * 4;
                u32::from_le_bytes([tile[at], tile[at + 1], tile[at + 2], tile[at + 3]])
            };
            let lo = |w: u32| f32::from_bits(w << 16);
            let hi = |w: u32| f32::from_bits(w & 0xFFFF_0000);
            for i in 0..m_rows {
                for j in 0..n {
                    let mut acc = f32::from_bits(word(&t.data[dst], i, j));
                    for p in 0..k {
                        let (av, bv) = (word(&t.data[a], i, p), word(&t.data[bt], p, j));
                        acc += lo(av) * lo(bv);
                        acc += hi(av) * hi(bv);
                    }
                    t.data[dst][i * 64 + j * 4..][..4].copy_from_slice(&acc.to_le_bytes());
                }
            }
            COUNTS[5].fetch_add(1, Ordering::Relaxed);
            Some(5)
        }
        _ => None,
    }
}

/// The bytes of zmm`n` in the XSAVE area `xs` of a signal frame; with `write`, replaces them
/// by its bytes instead (and returns zeros). A component whose XSTATE_BV bit is clear holds its initial value, zero: it is
/// read as such, and zeroed before its bit is set for a write.
///
/// # Safety
/// `xs` is a signal frame's XSAVE area holding the components at [`XSAVE_OFFSETS`].
unsafe fn zmm(xs: *mut u8, n: usize, write: Option<&[u8; 64]>) -> [u8; 64] {
    let off = |i: usize| XSAVE_OFFSETS[i].load(Ordering::Relaxed);
    // (XSTATE_BV bit, component start, bytes per register, register's offset, bytes of zmm).
    let parts: &[(u32, usize, usize, usize, std::ops::Range<usize>)] = if n < 16 {
        &[
            (1, 160, 16 * 16, 160 + 16 * n, 0..16),
            (2, off(0), 16 * 16, off(0) + 16 * n, 16..32),
            (6, off(1), 32 * 16, off(1) + 32 * n, 32..64),
        ]
    } else {
        &[(7, off(2), 64 * 16, off(2) + 64 * (n - 16), 0..64)]
    };
    let mut v = [0u8; 64];
    // SAFETY: the header and the components lie in the frame's XSAVE area (the contract).
    unsafe {
        let bv = xs.add(512).cast::<u64>();
        for (bit, start, size, at, range) in parts.iter().cloned() {
            let set = bv.read_unaligned() & 1 << bit != 0;
            match write {
                None if set => v[range.clone()]
                    .copy_from_slice(std::slice::from_raw_parts(xs.add(at), range.len())),
                None => {}
                Some(new) => {
                    if !set {
                        std::ptr::write_bytes(xs.add(start), 0, size);
                        bv.write_unaligned(bv.read_unaligned() | 1 << bit);
                    }
                    std::slice::from_raw_parts_mut(xs.add(at), range.len())
                        .copy_from_slice(&new[range]);
                }
            }
        }
    }
    v
}

/// Emulates `vdpbf16ps zmm, zmm, zmm` at `ip` on the registers in `xs`; returns its length.
///
/// # Safety
/// `ip` points at the faulting instruction (at least 6 bytes when its first is 0x62), `xs`
/// at the frame's XSAVE area.
unsafe fn emulate_evex(ip: *const u8, xs: *mut u8) -> Option<usize> {
    // SAFETY: the caller's contract.
    let byte = |i: usize| unsafe { *ip.add(i) };
    let (p0, p1, p2, op, modrm) = (byte(1), byte(2), byte(3), byte(4), byte(5));
    // P0: map 0F38; P1: W0, pp F3; P2: no zeroing, 512 bits, no broadcast, no mask.
    if p0 & 0x0F != 2 || p1 & 0x87 != 0x06 || p2 & 0xF7 != 0x40 || op != 0x52 || modrm >> 6 != 3 {
        return None;
    }
    let bit = |v: u8, i: u8| usize::from((!v >> i) & 1);
    let dst = usize::from((modrm >> 3) & 7) | bit(p0, 7) << 3 | bit(p0, 4) << 4;
    let src2 = usize::from(modrm & 7) | bit(p0, 5) << 3 | bit(p0, 6) << 4;
    let src1 = usize::from((!p1 >> 3) & 0xF) | bit(p2, 3) << 4;
    let lanes = |z: [u8; 64]| -> [u32; 16] {
        std::array::from_fn(|j| {
            u32::from_le_bytes([z[4 * j], z[4 * j + 1], z[4 * j + 2], z[4 * j + 3]])
        })
    };
    // SAFETY: the caller's contract.
    let (acc, a, b) = unsafe {
        (
            zmm(xs, dst, None),
            lanes(zmm(xs, src1, None)),
            lanes(zmm(xs, src2, None)),
        )
    };
    let (hi, lo) = (
        |w: u32| f32::from_bits(w & 0xFFFF_0000),
        |w: u32| f32::from_bits(w << 16),
    );
    let mut out = [0u8; 64];
    for (j, &w) in lanes(acc).iter().enumerate() {
        let mut v = f32::from_bits(w);
        v += hi(a[j]) * hi(b[j]);
        v += lo(a[j]) * lo(b[j]);
        out[4 * j..4 * j + 4].copy_from_slice(&v.to_le_bytes());
    }
    // SAFETY: the caller's contract.
    unsafe { zmm(xs, dst, Some(&out)) };
    COUNTS[6].fetch_add(1, Ordering::Relaxed);
    Some(6)
}

/// `FP_XSTATE_MAGIC1`: the signal frame's FXSAVE area is followed by XSAVE extended state.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;

extern "C" fn on_sigill(_signal: libc::c_int, _info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes the interrupted thread's ucontext, whose registers (general
    // and, in its XSAVE area, the vector ones) are restored from it on return; the tile
    // state is this thread's, and only the handler touches it.
    unsafe {
        let uc = &mut *context.cast::<libc::ucontext_t>();
        let gregs = &mut uc.uc_mcontext.gregs;
        let ip = gregs[libc::REG_RIP as usize] as *const u8;
        let xs = uc.uc_mcontext.fpregs.cast::<u8>();
        let emulated = if *ip == 0x62 {
            // The software-reserved bytes of the FXSAVE area say whether XSAVE state follows.
            if xs.is_null() || xs.add(464).cast::<u32>().read_unaligned() != FP_XSTATE_MAGIC1 {
                problem(5);
                None
            } else {
                emulate_evex(ip, xs)
            }
        } else {
            TILES.with(|t| emulate(ip, gregs, &mut *t.get()))
        };
        match emulated {
            Some(len) => gregs[libc::REG_RIP as usize] += len as i64,
            // Not an instruction of ours: fault again, as without this handler.
            None => {
                problem(4);
                libc::signal(libc::SIGILL, libc::SIG_DFL);
            }
        }
    }
}

/// The handler installed (one test at a time), the previous one put back on drop.
struct Trap {
    old: libc::sigaction,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Trap {
    /// Installs the handler and zeroes the counts, to emulate the instructions of `kind`
    /// (`Amx` or `Avx512Bf16`); `None` on a CPU that has them (its native tests run the
    /// kernels there), or without AVX-512F where the test needs it (`avx512`: the bf16
    /// tilings' epilogue, the `vdpbf16ps` kernel's other instructions).
    fn install(kind: IsaKind, avx512: bool) -> Option<Trap> {
        if Isa::new(kind).is_some() {
            eprintln!("SKIPPED: this CPU has {kind}: the native tests run its kernel");
            return None;
        }
        if avx512 && Isa::new(IsaKind::Avx512).is_none() {
            eprintln!("SKIPPED: this test needs AVX-512F, which this CPU lacks");
            return None;
        }
        let one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        PROBLEM.store(0, Ordering::Relaxed);
        for c in &COUNTS {
            c.store(0, Ordering::Relaxed);
        }
        for (slot, leaf) in XSAVE_OFFSETS.iter().zip([2, 6, 7]) {
            let offset = std::arch::x86_64::__cpuid_count(0xD, leaf).ebx;
            slot.store(offset as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigill as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(libc::SIGILL, &sa, &mut old), 0);
            Some(Trap { old, _one: one })
        }
    }

    /// The instruction set this trap stands in for, as the kernels' token.
    fn isa(&self, kind: IsaKind) -> Isa {
        // SAFETY: the instructions of `kind` are emulated while `self` lives, and `install`
        // checked AVX-512F for the tests that run these tokens' tilings; neither tiling uses
        // an instruction of the other.
        unsafe {
            match kind {
                IsaKind::Amx => Isa::Amx(AmxBf16::assume()),
                _ => Isa::Avx512Bf16(Avx512Bf16::assume()),
            }
        }
    }

    /// The counts so far (ldtilecfg, tilerelease, tilezero, tileloadd, tilestored,
    /// tdpbf16ps, vdpbf16ps), after checking that no problem was met.
    fn counts(&self) -> [usize; 7] {
        if let Some(p) = PROBLEM.load(Ordering::Relaxed).checked_sub(1) {
            panic!("the emulator met a problem: {}", PROBLEMS[p]);
        }
        std::array::from_fn(|i| COUNTS[i].load(Ordering::Relaxed))
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        // SAFETY: restores the action saved by `install`.
        unsafe { libc::sigaction(libc::SIGILL, &self.old, std::ptr::null_mut()) };
    }
}

/// The AMX kernel's machine code, under emulation, equals its plain-Rust stand-in on exact
/// inputs, for several depths and row strides, and writes nothing outside its 32×32 tile.
#[test]
fn the_amx_kernels_machine_code_runs_under_emulation() {
    let Some(trap) = Trap::install(IsaKind::Amx, false) else {
        return;
    };
    // SAFETY: the trap emulates every AMX instruction.
    let (calls, products) = unsafe { check_amx_kernel() };
    // ldtilecfg, tilerelease, tilezero, tileloadd, tilestored, tdpbf16ps, vdpbf16ps.
    assert_eq!(
        trap.counts(),
        [calls, calls, 4 * calls, products, 4 * calls, products, 0]
    );
    eprintln!("ran the AMX kernel's machine code under SIGILL emulation");
}

/// Every convolution case of the conv tests (odd sizes, row tails, the stem, in-place 1×1
/// with a partial panel, residual, ReLU, 1 and 2 worker threads, each with its own AMX
/// tiles) through the real AMX and `vdpbf16ps` kernels, under emulation.
#[test]
fn the_conv_cases_run_on_the_native_bf16_machine_code() {
    for kind in [IsaKind::Amx, IsaKind::Avx512Bf16] {
        let Some(trap) = Trap::install(kind, true) else {
            continue;
        };
        let t = Tiling::new(trap.isa(kind), true);
        check_tiling(&t, &format!("{kind} machine code (emulated)"));
        let [configs, releases, .., tiles, dots] = trap.counts();
        match kind {
            IsaKind::Amx => assert!(tiles > 0 && configs > 0 && releases == configs),
            _ => assert!(dots > 0 && tiles == 0),
        }
        eprintln!("ran the {kind} conv cases' machine code under SIGILL emulation");
    }
}

/// A whole bf16 ResNet-50 on the AMX machine code gives exactly the features of the AMX
/// blocking with `tdpbf16ps` in plain Rust. (The `vdpbf16ps` kernel's conv cases suffice:
/// at 32 products per trap, a network would take 8 million traps, ~45 s.)
#[test]
fn a_bf16_network_on_the_amx_machine_code_equals_the_stand_in() {
    let Some(trap) = Trap::install(IsaKind::Amx, true) else {
        return;
    };
    let arch = Arch::default();
    let (n, s) = (2, 40);
    let x = images(n, s);
    let native = FastResNet::with_arch(synthetic(), &arch, Precision::Bf16, trap.isa(IsaKind::Amx))
        .unwrap()
        .forward(&x, n, s, s)
        .unwrap();
    let emulated = FastResNet::with_tiling(
        synthetic(),
        &arch,
        Precision::Bf16,
        Isa::Portable,
        (emulated_amx_tiling(), Algorithm::Direct),
    )
    .unwrap()
    .forward(&x, n, s, s)
    .unwrap();
    assert!(trap.counts()[5] > 0, "no tdpbf16ps ran");
    assert_eq!(native, emulated);
}
