//! `backprop --explain`: the derivation of part 1 as printed, against the text
//! `tools/gen_backprop_explain.py` writes from its own numpy computation
//! (`tests/fixtures/backprop/explain_3441.txt`). The words must be equal; the numbers must
//! agree to 1e-7 relative (both sides print ten significant digits of float64 values that
//! were summed in possibly different orders).

use std::process::Command;

const PARAMS: &str = "tests/fixtures/backprop/params_3441.json";
const EXPECTED: &str = "tests/fixtures/backprop/explain_3441.txt";

/// Splits text into alternating words and numbers (`-?digits[.digits][e±digits]`).
fn tokens(text: &str) -> Vec<(bool, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_number = chars[i].is_ascii_digit()
            || (chars[i] == '-' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()));
        if starts_number {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            if chars.get(i) == Some(&'e') {
                let mut j = i + 1;
                if chars.get(j).is_some_and(|&c| c == '-' || c == '+') {
                    j += 1;
                }
                if chars.get(j).is_some_and(|c| c.is_ascii_digit()) {
                    i = j;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            out.push((true, chars[start..i].iter().collect()));
        } else {
            match out.last_mut() {
                Some((false, w)) => w.push(chars[i]),
                _ => out.push((false, chars[i].to_string())),
            }
            i += 1;
        }
    }
    out
}

fn explain(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cifar-finetune"))
        .arg("backprop")
        .args(args)
        .output()
        .expect("running cifar-finetune")
}

#[test]
fn explanation_matches_the_independent_python_derivation() {
    let out = explain(&["--params", PARAMS, "--explain"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8(out.stdout).unwrap();
    let want = std::fs::read_to_string(EXPECTED).unwrap();
    let (g, w) = (tokens(&got), tokens(&want));
    assert_eq!(
        g.len(),
        w.len(),
        "different structure:\n--- got ---\n{got}\n--- expected ---\n{want}"
    );
    let mut numbers = 0;
    for ((gn, gt), (wn, wt)) in g.iter().zip(&w) {
        assert_eq!(gn, wn, "`{gt}` against `{wt}`");
        if *gn {
            let (a, b): (f64, f64) = (gt.parse().unwrap(), wt.parse().unwrap());
            let tol = 1e-7 * a.abs().max(b.abs()).max(1e-12);
            assert!((a - b).abs() <= tol, "{gt} against {wt}");
            numbers += 1;
        } else {
            assert_eq!(gt, wt);
        }
    }
    assert!(numbers > 100, "only {numbers} numbers compared");
    // Each quantity the assignment asks for is there, with its finite-difference check.
    for q in [
        "1. δ^(4)_1",
        "2. ∂E/∂w^(3)_{12}",
        "3. δ^(3)_1",
        "4. ∂E/∂w^(2)_{11}",
        "5. δ^(2)_1",
        "6. ∂E/∂w^(1)_{11}",
    ] {
        assert!(got.contains(q), "{q} missing");
    }
    assert_eq!(got.matches("finite difference:").count(), 6);
    assert_eq!(got.matches("(relative error below 1e-8)").count(), 6);
}

#[test]
fn explain_refuses_other_networks() {
    let out = explain(&["--seed", "1", "--sizes", "3,2,1", "--explain"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--explain") && err.contains("3-2-1"), "{err}");
}
