//! `backprop --explain`: part 1 of the assignment as a derivation a student can read, in
//! the seed's notation, each quantity with its chain of factors and its finite-difference
//! check.

use super::*;

/// A number as the explanation prints it: at most 10 significant digits, plain decimals from
/// 1e-4 to 1e6 (trailing zeros dropped), scientific notation otherwise; negative numbers in
/// parentheses so that products read unambiguously. `tools/gen_backprop_explain.py` mirrors it.
fn explain_num(x: f64) -> String {
    let body = if x == 0.0 {
        "0".to_string()
    } else if (1e-4..1e6).contains(&x.abs()) {
        let digits_before = x.abs().log10().floor() as i32 + 1;
        let decimals = (10 - digits_before).max(0) as usize;
        let s = format!("{x:.decimals$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        if s == "-0" { "0".to_string() } else { s }
    } else {
        let s = format!("{x:.9e}");
        match s.split_once('e') {
            Some((m, e)) => {
                let m = if m.contains('.') {
                    m.trim_end_matches('0').trim_end_matches('.')
                } else {
                    m
                };
                format!("{m}e{e}")
            }
            None => s,
        }
    };
    if x < 0.0 && body != "0" {
        format!("({body})")
    } else {
        body
    }
}

/// The finite-difference line under each derived quantity.
fn explain_check(out: &mut String, e: &CheckEntry) {
    use std::fmt::Write as _;
    let rel = if e.rel_error < 1e-8 {
        "below 1e-8".to_string()
    } else {
        format!("{:.1e}", e.rel_error)
    };
    let _ = writeln!(
        out,
        "   finite difference: {} (relative error {rel})",
        explain_num(e.numeric)
    );
}

impl Problem {
    /// Part 1 of the assignment as a derivation a student can read: for the 3-4-4-1 network
    /// without biases (the assignment's), the forward pass and then each quantity the
    /// assignment asks for — δ^(4)_1, ∂E/∂w^(3)_{12}, δ^(3)_1, ∂E/∂w^(2)_{11}, δ^(2)_1,
    /// ∂E/∂w^(1)_{11} — as its symbolic formula with the chain of factors written out, the
    /// same formula with this problem's numbers, its value, and its finite-difference check.
    /// `source` says where the parameters came from (first line). The text, not only its
    /// numbers, is compared with `tools/gen_backprop_explain.py`'s in the tests.
    pub fn explain(&self, source: &str) -> Result<String> {
        use std::fmt::Write as _;
        let net = &self.network;
        if net.sizes() != DEFAULT_SIZES || net.biases().is_some() {
            return Err(Error::invalid(
                "explain",
                format!(
                    "follows the assignment's 3-4-4-1 network without biases; this one is {}{}",
                    net.sizes_label(),
                    if net.biases().is_some() {
                        " with biases"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let (x, t) = (&self.x, self.t[0]);
        let fwd = net.forward(x, &self.t)?;
        let grads = net.backward(&fwd, &self.t)?;
        let check = net.gradient_check(x, &self.t)?;
        let w = net.weights();
        // w^(l)_{jk}, 1-based as in the notation.
        let wv = |l: usize, j: usize, k: usize| w[l - 1][(j - 1) * net.sizes()[l - 1] + (k - 1)];
        let a = |l: usize, j: usize| fwd.a[l - 1][j - 1];
        let z = |l: usize, j: usize| fwd.z[l - 1][j - 1];
        let hp = |l: usize, j: usize| z(l, j) * (1.0 - z(l, j));
        let d = |l: usize, j: usize| grads.delta[l - 1][j - 1];
        let n = explain_num;
        let mut o = String::new();

        let _ = writeln!(
            o,
            "Error propagation in the assignment's 3-4-4-1 network, step by step ({source})"
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Notation (the assignment's): x_1, x_2, x_3 are the inputs; a^(l)_j is the activation of unit j"
        );
        let _ = writeln!(
            o,
            "of layer l and z^(l)_j = h(a^(l)_j) its output; w^(l)_{{jk}} is the weight from unit k of layer l"
        );
        let _ = writeln!(
            o,
            "to unit j of layer l+1; h(a) = 1/(1 + e^(-a)) in the hidden layers 2 and 3, the identity at the"
        );
        let _ = writeln!(
            o,
            "output, so y = a^(4)_1; E = 1/2 (y - t)^2; δ^(l)_j = ∂E/∂a^(l)_j."
        );
        let _ = writeln!(
            o,
            "Corrected from the seed's report: a^(2)_1 has three input terms, not a fourth w^(1)_{{14}} x_4 (there are three inputs), and δ^(4)_1 = (2/2)(a^(4)_1 - t) needs its parentheses."
        );
        let _ = writeln!(o);

        let _ = writeln!(o, "Forward pass");
        let _ = writeln!(
            o,
            "   x = ({}, {}, {}), t = {}",
            n(x[0]),
            n(x[1]),
            n(x[2]),
            n(t)
        );
        let _ = writeln!(
            o,
            "   a^(2)_j = w^(1)_{{j1}} x_1 + w^(1)_{{j2}} x_2 + w^(1)_{{j3}} x_3,   z^(2)_j = h(a^(2)_j)"
        );
        for j in 1..=4 {
            let _ = writeln!(
                o,
                "   a^(2)_{j} = {} × {} + {} × {} + {} × {} = {},   z^(2)_{j} = {}",
                n(wv(1, j, 1)),
                n(x[0]),
                n(wv(1, j, 2)),
                n(x[1]),
                n(wv(1, j, 3)),
                n(x[2]),
                n(a(2, j)),
                n(z(2, j))
            );
        }
        let _ = writeln!(
            o,
            "   a^(3)_j = w^(2)_{{j1}} z^(2)_1 + w^(2)_{{j2}} z^(2)_2 + w^(2)_{{j3}} z^(2)_3 + w^(2)_{{j4}} z^(2)_4,   z^(3)_j = h(a^(3)_j)"
        );
        for j in 1..=4 {
            let _ = writeln!(
                o,
                "   a^(3)_{j} = {},   z^(3)_{j} = {}",
                n(a(3, j)),
                n(z(3, j))
            );
        }
        let _ = writeln!(
            o,
            "   y = a^(4)_1 = w^(3)_{{11}} z^(3)_1 + w^(3)_{{12}} z^(3)_2 + w^(3)_{{13}} z^(3)_3 + w^(3)_{{14}} z^(3)_4 = {}",
            n(a(4, 1))
        );
        let _ = writeln!(
            o,
            "   E = 1/2 (y - t)^2 = 1/2 ({} - {})^2 = {}",
            n(a(4, 1)),
            n(t),
            n(fwd.loss)
        );
        let _ = writeln!(o);

        // 1. δ^(4)_1
        let _ = writeln!(o, "1. δ^(4)_1 = ∂E/∂a^(4)_1");
        let _ = writeln!(
            o,
            "   E = 1/2 (a^(4)_1 - t)^2 because y = a^(4)_1 (identity output), so"
        );
        let _ = writeln!(o, "   δ^(4)_1 = (2/2)(a^(4)_1 - t) = a^(4)_1 - t");
        let _ = writeln!(o, "           = {} - {} = {}", n(a(4, 1)), n(t), n(d(4, 1)));
        explain_check(&mut o, &check.delta[3][0]);
        let _ = writeln!(o);

        // 2. ∂E/∂w^(3)_{12}
        let _ = writeln!(o, "2. ∂E/∂w^(3)_{{12}}");
        let _ = writeln!(
            o,
            "   = ∂E/∂a^(4)_1 · ∂a^(4)_1/∂w^(3)_{{12}} = δ^(4)_1 z^(3)_2   (of the four terms of a^(4)_1 only w^(3)_{{12}} z^(3)_2 holds w^(3)_{{12}})"
        );
        let _ = writeln!(
            o,
            "   = {} × {} = {}",
            n(d(4, 1)),
            n(z(3, 2)),
            n(grads.dw[2][1])
        );
        explain_check(&mut o, &check.dw[2][1]);
        let _ = writeln!(o);

        // 3. δ^(3)_1
        let _ = writeln!(o, "3. δ^(3)_1 = ∂E/∂a^(3)_1");
        let _ = writeln!(
            o,
            "   = ∂E/∂a^(4)_1 · ∂a^(4)_1/∂z^(3)_1 · ∂z^(3)_1/∂a^(3)_1 = δ^(4)_1 w^(3)_{{11}} h'(a^(3)_1)"
        );
        let _ = writeln!(
            o,
            "   h'(a) = e^(-a)/(1 + e^(-a))^2 = h(a)(1 - h(a)), so h'(a^(3)_1) = z^(3)_1 (1 - z^(3)_1) = {} × (1 - {}) = {}",
            n(z(3, 1)),
            n(z(3, 1)),
            n(hp(3, 1))
        );
        let _ = writeln!(
            o,
            "   = {} × {} × {} = {}",
            n(d(4, 1)),
            n(wv(3, 1, 1)),
            n(hp(3, 1)),
            n(d(3, 1))
        );
        explain_check(&mut o, &check.delta[2][0]);
        let _ = writeln!(o);

        // 4. ∂E/∂w^(2)_{11}
        let _ = writeln!(o, "4. ∂E/∂w^(2)_{{11}}");
        let _ = writeln!(
            o,
            "   = ∂E/∂a^(3)_1 · ∂a^(3)_1/∂w^(2)_{{11}} = δ^(3)_1 z^(2)_1   (a^(3)_1 = w^(2)_{{11}} z^(2)_1 + w^(2)_{{12}} z^(2)_2 + w^(2)_{{13}} z^(2)_3 + w^(2)_{{14}} z^(2)_4)"
        );
        let _ = writeln!(
            o,
            "   = {} × {} = {}",
            n(d(3, 1)),
            n(z(2, 1)),
            n(grads.dw[1][0])
        );
        explain_check(&mut o, &check.dw[1][0]);
        let _ = writeln!(o);

        // 5. δ^(2)_1
        let _ = writeln!(o, "5. δ^(2)_1 = ∂E/∂a^(2)_1");
        let _ = writeln!(
            o,
            "   a^(2)_1 reaches E through z^(2)_1 and every a^(3)_k (k = 1, ..., 4), so the chain rule sums over k:"
        );
        let _ = writeln!(
            o,
            "   = Σ_k ∂E/∂a^(3)_k · ∂a^(3)_k/∂a^(2)_1 = [δ^(3)_1 w^(2)_{{11}} + δ^(3)_2 w^(2)_{{21}} + δ^(3)_3 w^(2)_{{31}} + δ^(3)_4 w^(2)_{{41}}] h'(a^(2)_1)"
        );
        let _ = writeln!(
            o,
            "   with δ^(3)_k = δ^(4)_1 w^(3)_{{1k}} h'(a^(3)_k) = δ^(4)_1 w^(3)_{{1k}} z^(3)_k (1 - z^(3)_k):"
        );
        for k in 1..=4 {
            let _ = writeln!(
                o,
                "     δ^(3)_{k} = {} × {} × {} = {}",
                n(d(4, 1)),
                n(wv(3, 1, k)),
                n(hp(3, k)),
                n(d(3, k))
            );
        }
        let _ = writeln!(
            o,
            "   and h'(a^(2)_1) = z^(2)_1 (1 - z^(2)_1) = {} × (1 - {}) = {}",
            n(z(2, 1)),
            n(z(2, 1)),
            n(hp(2, 1))
        );
        let _ = writeln!(
            o,
            "   = [{} × {} + {} × {} + {} × {} + {} × {}] × {} = {}",
            n(d(3, 1)),
            n(wv(2, 1, 1)),
            n(d(3, 2)),
            n(wv(2, 2, 1)),
            n(d(3, 3)),
            n(wv(2, 3, 1)),
            n(d(3, 4)),
            n(wv(2, 4, 1)),
            n(hp(2, 1)),
            n(d(2, 1))
        );
        explain_check(&mut o, &check.delta[1][0]);
        let _ = writeln!(o);

        // 6. ∂E/∂w^(1)_{11}
        let _ = writeln!(o, "6. ∂E/∂w^(1)_{{11}}");
        let _ = writeln!(
            o,
            "   = ∂E/∂a^(2)_1 · ∂a^(2)_1/∂w^(1)_{{11}} = δ^(2)_1 x_1   (a^(2)_1 = w^(1)_{{11}} x_1 + w^(1)_{{12}} x_2 + w^(1)_{{13}} x_3)"
        );
        let _ = writeln!(
            o,
            "   = {} × {} = {}",
            n(d(2, 1)),
            n(x[0]),
            n(grads.dw[0][0])
        );
        explain_check(&mut o, &check.dw[0][0]);
        Ok(o)
    }
}
