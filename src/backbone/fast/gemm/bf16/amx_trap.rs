//! The AMX micro-kernel's own machine code, run on a CPU without AMX: each AMX instruction
//! raises #UD (SIGILL), and a signal handler decodes and emulates it on a software tile state,
//! then resumes after it. So the `asm!` of [`super::amx`] — its encodings as the assembler
//! wrote them, the operand roles of `tdpbf16ps`, the strides, the address arithmetic of the
//! loop and the 64-byte tile configuration — executes on every CPU, not only where AMX exists.
//!
//! Only the six instructions the kernel and its [`super::amx::TileSession`] emit are decoded:
//! `ldtilecfg`, `tilerelease`, `tilezero`, `tileloadd`, `tilestored` and `tdpbf16ps` (Intel
//! SDM vol. 2, "Intel AMX Instruction Set Reference"; VEX.128.0F38.W0 opcodes 49, 4B and 5C,
//! checked against objdump's disassembly of the kernel). Their semantics follow the SDM's
//! pseudo-code: configured rows × bytes per row, `stride = index << scale`, a load zeroing
//! what it does not write, and `tdpbf16ps`'s shape rules (a violation, #UD on hardware, is
//! recorded as an error). The dot product adds the pairs' products in the Intrinsics Guide's
//! order, the stand-in's, so results equal the plain-Rust AMX blocking bit for bit; hardware
//! may round its sums otherwise, which is why the native test uses exact integers.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::super::tests::check_tiling;
use super::super::{Tiling, emulated_amx_tiling};
use super::tests::check_amx_kernel;
use crate::backbone::arch::Arch;
use crate::backbone::fast::{FastResNet, Precision};
use crate::backbone::weights::{self, StateDict};
use crate::isa::{AmxBf16, Isa, IsaKind};

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
/// tileloadd, tilestored, tdpbf16ps.
static COUNTS: [AtomicUsize; 6] = [const { AtomicUsize::new(0) }; 6];
/// The first problem met (1 + an index into [`PROBLEMS`]; 0: none).
static PROBLEM: AtomicUsize = AtomicUsize::new(0);
const PROBLEMS: [&str; 5] = [
    "ldtilecfg: not palette 1 with start_row 0 and zero reserved bytes",
    "ldtilecfg: a tile beyond 16 rows of 64 bytes",
    "an AMX instruction on an unconfigured tile",
    "tdpbf16ps: tile shapes that do not multiply (#UD on hardware)",
    "a SIGILL that is not one of the six AMX instructions",
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

extern "C" fn on_sigill(_signal: libc::c_int, _info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes the interrupted thread's ucontext; the tile state is this
    // thread's, and the handler interrupted no access to it (only the handler touches it).
    unsafe {
        let uc = &mut *context.cast::<libc::ucontext_t>();
        let gregs = &mut uc.uc_mcontext.gregs;
        let ip = gregs[libc::REG_RIP as usize] as *const u8;
        match TILES.with(|t| emulate(ip, gregs, &mut *t.get())) {
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
    /// Installs the handler and zeroes the counts; `None` on a CPU with AMX (its native
    /// tests run the kernel there), or without AVX-512F when the test runs the AMX tiling
    /// (`tiling`), whose epilogue is compiled for it.
    fn install(tiling: bool) -> Option<Trap> {
        if Isa::new(IsaKind::Amx).is_some() {
            eprintln!("SKIPPED: this CPU has AMX: the native tests run its kernel");
            return None;
        }
        if tiling && Isa::new(IsaKind::Avx512).is_none() {
            eprintln!("SKIPPED: the AMX tiling's epilogue needs AVX-512F, which this CPU lacks");
            return None;
        }
        let one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        PROBLEM.store(0, Ordering::Relaxed);
        for c in &COUNTS {
            c.store(0, Ordering::Relaxed);
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

    /// The token of an AMX CPU, for code run under this trap.
    fn token(&self) -> AmxBf16 {
        // SAFETY: AMX instructions are emulated while `self` lives, and `install` checked
        // AVX-512F; the AMX tiling uses no AVX512-BF16 instruction.
        unsafe { AmxBf16::assume() }
    }

    /// The counts so far (ldtilecfg, tilerelease, tilezero, tileloadd, tilestored,
    /// tdpbf16ps), after checking that no problem was met.
    fn counts(&self) -> [usize; 6] {
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

/// The kernel's machine code, under emulation, equals its plain-Rust stand-in on exact
/// inputs, for several depths and row strides, and writes nothing outside its 32×32 tile.
#[test]
fn the_amx_kernels_machine_code_runs_under_emulation() {
    let Some(trap) = Trap::install(false) else {
        return;
    };
    // SAFETY: the trap emulates every AMX instruction.
    let (calls, products) = unsafe { check_amx_kernel() };
    // ldtilecfg, tilerelease, tilezero, tileloadd, tilestored, tdpbf16ps.
    assert_eq!(
        trap.counts(),
        [calls, calls, 4 * calls, products, 4 * calls, products]
    );
    eprintln!("ran the AMX kernel's machine code under SIGILL emulation");
}

/// Every convolution case of the conv tests (odd sizes, row tails, the stem, in-place 1×1
/// with a partial panel, residual, ReLU, 1 and 2 worker threads, each with its own tiles)
/// through the real AMX kernel and tile sessions, under emulation.
#[test]
fn the_conv_cases_run_on_the_amx_machine_code() {
    let Some(trap) = Trap::install(true) else {
        return;
    };
    let t = Tiling::new(Isa::Amx(trap.token()), true);
    check_tiling(&t, "32x32 AMX machine code (emulated)");
    let [configs, releases, .., products] = trap.counts();
    assert!(products > 0 && configs > 0 && releases == configs);
}

/// A whole bf16 ResNet-50 on the AMX machine code gives exactly the features of the AMX
/// blocking with `tdpbf16ps` in plain Rust.
#[test]
fn a_bf16_network_on_the_amx_machine_code_equals_the_stand_in() {
    let Some(trap) = Trap::install(true) else {
        return;
    };
    let sd = || StateDict::from_tensors("synthetic", weights::synthetic_state_dict().unwrap());
    let arch = Arch::default();
    let (n, s) = (2, 40);
    let x: Vec<f32> = (0..n * 3 * s * s)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5)
        .collect();
    let native = FastResNet::with_arch(sd(), &arch, Precision::Bf16, Isa::Amx(trap.token()))
        .unwrap()
        .forward(&x, n, s, s)
        .unwrap();
    let emulated = FastResNet::with_tiling(
        sd(),
        &arch,
        Precision::Bf16,
        Isa::Portable,
        emulated_amx_tiling(),
    )
    .unwrap()
    .forward(&x, n, s, s)
    .unwrap();
    assert!(trap.counts()[5] > 0, "no tdpbf16ps ran");
    assert_eq!(native, emulated);
}
