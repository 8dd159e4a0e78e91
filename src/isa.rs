//! The kernel seam: the instruction set the SIMD kernels run on, chosen once, as a value that
//! proves this CPU has it.
//!
//! Each x86-64 feature set the crate has kernels for is a zero-sized token type
//! ([`Avx2Fma`], [`Avx512`], [`Avx512Bf16`], [`AmxBf16`]) whose only constructor checks the
//! CPU at run time (`is_x86_feature_detected!`; for AMX, CPUID and a request to Linux, see
//! [`AmxBf16::new`]) and returns `None` when a feature is missing. A function
//! that takes a token by value can therefore run those instructions without repeating the
//! check: holding the token is the proof. [`Isa`] carries the token of the best set chosen
//! (or [`Isa::Portable`], which needs none) and is what the head (`crate::head`) and the
//! backbone's matrix products (`crate::backbone::fast`) dispatch on; [`IsaKind`] is its name,
//! for logs, benchmarks and command lines.
//!
//! The hierarchy is explicit: an [`Avx512`] token is only made when AVX2 and FMA are present
//! too (true of every AVX-512 CPU, but checked rather than assumed), so it can hand out an
//! [`Avx2Fma`] token, an [`Avx512Bf16`] token an [`Avx512`] one, and an [`AmxBf16`] token an
//! [`Avx512Bf16`] one.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Proof that this CPU runs AVX2 and FMA instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Avx2Fma {
    _private: (),
}

/// Proof that this CPU runs AVX-512F instructions (and AVX2 and FMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Avx512 {
    _private: (),
}

/// Proof that this CPU runs AVX-512F and AVX512-BF16 instructions (and AVX2 and FMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Avx512Bf16 {
    _private: (),
}

/// Proof that this CPU runs AMX-TILE and AMX-BF16 instructions, that Linux has granted this
/// process the tile state, and that the CPU has AVX512-BF16 (and so AVX-512F, AVX2, FMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AmxBf16 {
    _private: (),
}

/// True when the CPU has every feature of `list` (x86-64 only; false elsewhere).
macro_rules! has {
    ($($feat:tt),+) => {{
        #[cfg(target_arch = "x86_64")]
        {
            true $(&& std::arch::is_x86_feature_detected!($feat))+
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }};
}

impl Avx2Fma {
    /// The token, when this CPU has AVX2 and FMA.
    pub fn new() -> Option<Avx2Fma> {
        has!("avx2", "fma").then_some(Avx2Fma { _private: () })
    }
}

impl Avx512 {
    /// The token, when this CPU has AVX-512F, AVX2 and FMA.
    pub fn new() -> Option<Avx512> {
        has!("avx512f", "avx2", "fma").then_some(Avx512 { _private: () })
    }

    /// AVX-512 CPUs run AVX2 and FMA (checked when `self` was made).
    pub fn avx2_fma(self) -> Avx2Fma {
        Avx2Fma { _private: () }
    }
}

impl Avx512Bf16 {
    /// The token, when this CPU has AVX-512F, AVX512-BF16, AVX2 and FMA.
    pub fn new() -> Option<Avx512Bf16> {
        has!("avx512f", "avx512bf16", "avx2", "fma").then_some(Avx512Bf16 { _private: () })
    }

    /// The AVX-512F token this one implies.
    pub fn avx512(self) -> Avx512 {
        Avx512 { _private: () }
    }

    /// The token without asking the CPU: for the tests that run the `vdpbf16ps` kernel's
    /// machine code through a SIGILL emulator on CPUs without AVX512-BF16.
    ///
    /// # Safety
    /// Every AVX512-BF16 instruction is emulated while the token is used (see
    /// `backbone::fast::gemm::bf16::trap`), and the CPU has AVX-512F, AVX2 and FMA.
    #[cfg(test)]
    #[allow(unsafe_code)]
    pub(crate) unsafe fn assume() -> Avx512Bf16 {
        Avx512Bf16 { _private: () }
    }
}

impl AmxBf16 {
    /// The token, when CPUID reports AMX-TILE and AMX-BF16 (leaf 7, sub-leaf 0, EDX bits 24
    /// and 22), the CPU has AVX512-BF16, and Linux grants the process the tile data state
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once per process: until
    /// then the first tile instruction faults). `None` wherever any of these fails, e.g. on a
    /// kernel older than 5.16 or under a hypervisor that hides the state; the kernels then
    /// fall back to AVX512-BF16. `is_x86_feature_detected!("amx-bf16")` is still unstable
    /// (rust-lang/rust#126622), hence CPUID by hand.
    pub fn new() -> Option<AmxBf16> {
        static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let granted = *GRANTED.get_or_init(|| Avx512Bf16::new().is_some() && amx::request());
        granted.then_some(AmxBf16 { _private: () })
    }

    /// The AVX512-BF16 token this one implies.
    pub fn avx512_bf16(self) -> Avx512Bf16 {
        Avx512Bf16 { _private: () }
    }

    /// The token without asking the CPU: for the tests that run the AMX kernel's machine
    /// code through a SIGILL emulator on CPUs without AMX.
    ///
    /// # Safety
    /// Every AMX instruction is emulated while the token is used (see
    /// `backbone::fast::gemm::bf16::trap`), the CPU has AVX-512F, AVX2 and FMA (the AMX
    /// tiling's epilogue, the f32 layers), and nothing uses the AVX512-BF16 token it implies.
    #[cfg(test)]
    #[allow(unsafe_code)]
    pub(crate) unsafe fn assume() -> AmxBf16 {
        AmxBf16 { _private: () }
    }
}

#[allow(unsafe_code)]
mod amx {
    //! CPUID and the Linux permission request behind [`super::AmxBf16::new`].

    /// True when CPUID reports AMX-TILE and AMX-BF16 and Linux grants the tile data state.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    pub(super) fn request() -> bool {
        /// `SYS_arch_prctl` on x86-64 Linux.
        const SYS_ARCH_PRCTL: i64 = 158;
        /// Request permission for a dynamically enabled XSAVE feature.
        const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
        /// The AMX tile data state component.
        const XFEATURE_XTILEDATA: u64 = 18;
        // SAFETY: CPUID is part of x86-64; leaf 7 exists on every CPU with AVX512-BF16 (checked
        // by the caller before this runs).
        #[allow(unused_unsafe)]
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        let (tile, bf16) = (edx >> 24 & 1 == 1, edx >> 22 & 1 == 1);
        if !(tile && bf16) {
            return false;
        }
        let ret: i64;
        // SAFETY: arch_prctl only changes this process's permitted XSAVE features; the syscall
        // clobbers rcx and r11 (declared) and reads no memory of ours.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    /// No AMX outside x86-64 Linux.
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    pub(super) fn request() -> bool {
        false
    }
}

/// The name of an instruction set the kernels exist for, best first; see [`Isa`] for the
/// value that proves one is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IsaKind {
    /// AMX tiles (`tdpbf16ps`) for bf16, on top of AVX512-BF16.
    Amx,
    /// AVX-512F plus AVX512-BF16 (native bf16 dot products).
    Avx512Bf16,
    /// AVX-512F.
    Avx512,
    /// AVX2 + FMA.
    Avx2Fma,
    /// Plain Rust: no instruction-set assumption.
    Portable,
}

impl IsaKind {
    /// Every kind, best first.
    pub const ALL: [IsaKind; 5] = [
        IsaKind::Amx,
        IsaKind::Avx512Bf16,
        IsaKind::Avx512,
        IsaKind::Avx2Fma,
        IsaKind::Portable,
    ];

    /// A short name for logs, benchmarks and command lines.
    pub fn name(self) -> &'static str {
        match self {
            IsaKind::Amx => "amx",
            IsaKind::Avx512Bf16 => "avx512-bf16",
            IsaKind::Avx512 => "avx512",
            IsaKind::Avx2Fma => "avx2-fma",
            IsaKind::Portable => "portable",
        }
    }
}

impl fmt::Display for IsaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for IsaKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        IsaKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "instruction set",
                    format!("`{s}` is none of amx, avx512-bf16, avx512, avx2-fma, portable"),
                )
            })
    }
}

/// An instruction set this CPU has, carrying its proof: what kernels dispatch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AMX-TILE and AMX-BF16, granted by the OS, with AVX512-BF16.
    Amx(AmxBf16),
    /// AVX-512F and AVX512-BF16.
    Avx512Bf16(Avx512Bf16),
    /// AVX-512F.
    Avx512(Avx512),
    /// AVX2 and FMA.
    Avx2Fma(Avx2Fma),
    /// Plain Rust; available everywhere.
    Portable,
}

impl Isa {
    /// The best instruction set of this CPU.
    pub fn detect() -> Isa {
        IsaKind::ALL
            .into_iter()
            .find_map(Isa::new)
            .unwrap_or(Isa::Portable)
    }

    /// `kind`, when this CPU has it.
    pub fn new(kind: IsaKind) -> Option<Isa> {
        match kind {
            IsaKind::Amx => AmxBf16::new().map(Isa::Amx),
            IsaKind::Avx512Bf16 => Avx512Bf16::new().map(Isa::Avx512Bf16),
            IsaKind::Avx512 => Avx512::new().map(Isa::Avx512),
            IsaKind::Avx2Fma => Avx2Fma::new().map(Isa::Avx2Fma),
            IsaKind::Portable => Some(Isa::Portable),
        }
    }

    /// Every instruction set this CPU has, best first (portable last).
    pub fn available() -> Vec<Isa> {
        IsaKind::ALL.into_iter().filter_map(Isa::new).collect()
    }

    /// Which instruction set this is.
    pub fn kind(self) -> IsaKind {
        match self {
            Isa::Amx(_) => IsaKind::Amx,
            Isa::Avx512Bf16(_) => IsaKind::Avx512Bf16,
            Isa::Avx512(_) => IsaKind::Avx512,
            Isa::Avx2Fma(_) => IsaKind::Avx2Fma,
            Isa::Portable => IsaKind::Portable,
        }
    }

    /// A short name for logs and benchmark output (that of [`Isa::kind`]).
    pub fn name(self) -> &'static str {
        self.kind().name()
    }

    /// The AVX2 + FMA token, when `self` implies those features.
    pub fn avx2_fma(self) -> Option<Avx2Fma> {
        match self {
            Isa::Amx(t) => Some(t.avx512_bf16().avx512().avx2_fma()),
            Isa::Avx512Bf16(t) => Some(t.avx512().avx2_fma()),
            Isa::Avx512(t) => Some(t.avx2_fma()),
            Isa::Avx2Fma(t) => Some(t),
            Isa::Portable => None,
        }
    }

    /// The AVX-512F token, when `self` implies it.
    pub fn avx512(self) -> Option<Avx512> {
        match self {
            Isa::Amx(t) => Some(t.avx512_bf16().avx512()),
            Isa::Avx512Bf16(t) => Some(t.avx512()),
            Isa::Avx512(t) => Some(t),
            Isa::Avx2Fma(_) | Isa::Portable => None,
        }
    }

    /// The AVX512-BF16 token, when `self` implies it.
    pub fn avx512_bf16(self) -> Option<Avx512Bf16> {
        match self {
            Isa::Amx(t) => Some(t.avx512_bf16()),
            Isa::Avx512Bf16(t) => Some(t),
            _ => None,
        }
    }

    /// True when bf16 products run on native instructions (AMX or AVX512-BF16) rather than
    /// being emulated by the f32 kernels.
    pub fn native_bf16(self) -> bool {
        self.avx512_bf16().is_some()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_detection_is_the_best_available() {
        for kind in IsaKind::ALL {
            assert_eq!(kind.name().parse::<IsaKind>().unwrap(), kind);
        }
        assert!("sse2".parse::<IsaKind>().is_err());
        let all = Isa::available();
        assert_eq!(all.first().copied(), Some(Isa::detect()));
        assert_eq!(all.last().copied(), Some(Isa::Portable));
        for isa in all {
            assert_eq!(Isa::new(isa.kind()), Some(isa));
            // The implied tokens agree with what the CPU reports for them directly.
            assert!(isa.avx2_fma().is_none() || Avx2Fma::new().is_some());
            assert!(isa.avx512().is_none() || Avx512::new().is_some());
            assert!(isa.avx512_bf16().is_none() || Avx512Bf16::new().is_some());
        }
        eprintln!(
            "instruction sets of this CPU: {}",
            Isa::available()
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
