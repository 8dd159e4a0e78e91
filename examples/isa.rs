//! Prints the instruction sets this CPU has and which kernels therefore run natively, for CI
//! logs (`.ci/run`): kernel tests of an instruction set the CPU lacks are skipped, and this
//! says which.
//!
//! ```text
//! cargo run --example isa
//! ```

use cifar_finetune::isa::{Isa, IsaKind};

fn main() {
    let available = Isa::available();
    println!("best instruction set: {}", Isa::detect());
    for kind in IsaKind::ALL {
        let native = available.iter().any(|i| i.kind() == kind);
        let kernels = match kind {
            IsaKind::Amx => "backbone bf16 32x32 AMX tiles (tdpbf16ps)",
            IsaKind::Avx512Bf16 => "backbone bf16 12x32 vdpbf16ps",
            IsaKind::Avx512 => "backbone f32 6x64 (and bf16 emulated on it)",
            IsaKind::Avx2Fma => "backbone f32 6x16, head 8-lane AVX2",
            IsaKind::Portable => "backbone 4x8 and head 8-lane plain Rust",
        };
        let status = if native {
            "native"
        } else {
            "SKIPPED (not on this CPU)"
        };
        println!("  {:<12} {status:<26} {kernels}", kind.name());
    }
    // The tests of `backbone::fast::gemm::bf16::trap` run these kernels' machine code under a
    // SIGILL emulator where the instructions are missing (the AMX kernel on any x86-64 Linux
    // CPU, the conv cases on AVX-512 ones).
    let has = |k: IsaKind| available.iter().any(|i| i.kind() == k);
    let emulated: Vec<&str> = [IsaKind::Amx, IsaKind::Avx512Bf16]
        .into_iter()
        .filter(|&k| cfg!(all(target_arch = "x86_64", target_os = "linux")) && !has(k))
        .filter(|&k| k == IsaKind::Amx || has(IsaKind::Avx512))
        .map(IsaKind::name)
        .collect();
    if !emulated.is_empty() {
        println!(
            "emulated in the tests (SIGILL trap): {}",
            emulated.join(", ")
        );
    }
}
