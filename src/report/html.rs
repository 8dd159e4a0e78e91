//! `report.html`: one self-contained page with everything about a run.
//!
//! The page carries its own CSS, the plots as inline SVG and the test images as PNG `data:`
//! URIs; it names no external resource, so it renders the same offline, mailed or archived.
//! A Content-Security-Policy `<meta>` (`default-src 'none'`, images from `data:` only, inline
//! styles) makes the browser refuse any request that could slip in later, rather than
//! silently making it. The only scripting is none at all.
//!
//! Sections: a red warning box when the training went wrong (a λ diverged, a head predicts a
//! single class, a loss that never fell — `summary.json`'s `warnings`); headline numbers; the
//! chosen λ with every λ's best epoch and status; the run configuration and fingerprints; the
//! training plots; the test metrics (top-1 and top-5 accuracy, classification report, the
//! most confused pairs of classes, confusion matrix, per-class accuracy); the validation
//! split's when `test --split val` has scored it; a gallery of test images, misclassified
//! first, each with its true and predicted class and a bar per class probability (as the
//! course's own report did).
//!
//! Any number of classes reads: beyond [`MANY_CLASSES`] the classification report is sorted
//! by recall, worst first, the heat map carries no numbers and is shown at its own (larger)
//! size, scrolling sideways, and the confusion matrix is not repeated as a table (it is in
//! `metrics.json`); the most confused pairs say what the heat map shows.

use std::fmt::Write as _;

use base64::prelude::{BASE64_STANDARD, Engine as _};

use super::fmt_lambda;
use super::plots::{Figure, MANY_CLASSES};
use crate::data::{Dataset, Image, Part};
use crate::error::{Error, Result};
use crate::evaluate::{PredictionRow, TestMetrics};
use crate::head::Activation;
use crate::rundir::{RunConfig, Summary};

/// One test image of the gallery with its prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct GalleryItem {
    /// The image's index in the dataset's test part.
    pub index: u32,
    /// True class id.
    pub true_class: u8,
    /// Predicted class id.
    pub predicted: u8,
    /// Probability of every class.
    pub probabilities: Vec<f32>,
    /// The image as PNG bytes.
    pub png: Vec<u8>,
}

/// Everything the page shows. Only `config` is required; missing parts are left out with a
/// note saying why.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    /// The run directory's name, shown under the title.
    pub run_name: &'a str,
    /// `config.json`.
    pub config: &'a RunConfig,
    /// `summary.json` (absent while the sweep is unfinished).
    pub summary: Option<&'a Summary>,
    /// `metrics.json` (absent before the test evaluation).
    pub test: Option<&'a TestMetrics>,
    /// `metrics-val.json` (present after `test --split val`).
    pub val: Option<&'a TestMetrics>,
    /// Training plots (losses, error bars, accuracy spread), shown in the training section.
    pub training_figures: &'a [Figure],
    /// Test plots (confusion matrix, per-class accuracy), shown in the test section.
    pub test_figures: &'a [Figure],
    /// The gallery, in display order.
    pub gallery: &'a [GalleryItem],
    /// (misclassified, total) test images, to put the gallery in proportion.
    pub gallery_counts: Option<(usize, usize)>,
    /// Remarks on what is missing or was left out (shown near the top).
    pub notes: &'a [String],
}

/// The gallery's rows of `predictions`, misclassified images first: at most `limit` in all,
/// of which up to three quarters are mistakes (most confident mistakes first) and the rest
/// correct predictions (least confident first — the near misses), so both kinds are seen
/// when there are enough. Returns positions in `predictions`.
pub fn select_gallery(predictions: &[PredictionRow], limit: usize) -> Vec<usize> {
    let confidence = |r: &PredictionRow| {
        r.probabilities
            .get(r.predicted as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let mut wrong: Vec<usize> = (0..predictions.len())
        .filter(|&i| predictions[i].predicted != predictions[i].true_class)
        .collect();
    let mut right: Vec<usize> = (0..predictions.len())
        .filter(|&i| predictions[i].predicted == predictions[i].true_class)
        .collect();
    wrong.sort_by(|&a, &b| confidence(&predictions[b]).total_cmp(&confidence(&predictions[a])));
    right.sort_by(|&a, &b| confidence(&predictions[a]).total_cmp(&confidence(&predictions[b])));
    let right_quota = right.len().min(limit / 4);
    let n_wrong = wrong.len().min(limit - right_quota);
    let n_right = right.len().min(limit - n_wrong);
    wrong.truncate(n_wrong);
    wrong.extend_from_slice(&right[..n_right]);
    wrong
}

/// The gallery items for rows `rows` of `predictions`, with the images taken from `part` of
/// `dataset` (the part the test split was drawn from). Errors when an index is out of range or an image's label differs from
/// the true class in `predictions` (then the images are not the ones that were evaluated).
pub fn gallery_items(
    predictions: &[PredictionRow],
    rows: &[usize],
    dataset: &dyn Dataset,
    part: Part,
) -> Result<Vec<GalleryItem>> {
    let labels = dataset.labels(part)?;
    let mut items = Vec::with_capacity(rows.len());
    for &r in rows {
        let p = predictions.get(r).ok_or_else(|| {
            Error::invalid(
                "gallery",
                format!("row {r} of {} predictions", predictions.len()),
            )
        })?;
        let i = p.index as usize;
        if i >= labels.len() {
            return Err(Error::invalid(
                "gallery",
                format!(
                    "test image {i} is beyond the {} images available",
                    labels.len()
                ),
            ));
        }
        if labels[i] != p.true_class {
            return Err(Error::invalid(
                "gallery",
                format!(
                    "test image {i} is labelled {} in the data but {} in predictions.csv: \
                     these are not the images that were evaluated",
                    labels[i], p.true_class
                ),
            ));
        }
        items.push(GalleryItem {
            index: p.index,
            true_class: p.true_class,
            predicted: p.predicted,
            probabilities: p.probabilities.clone(),
            png: thumbnail_png(&dataset.image(part, i)?)?,
        });
    }
    Ok(items)
}

/// PNG bytes of one image (`[3, height, width]` planar).
pub fn thumbnail_png(image: &Image<'_>) -> Result<Vec<u8>> {
    let (h, w) = (image.height, image.width);
    let plane = h * w;
    if image.pixels.len() != 3 * plane {
        return Err(Error::invalid(
            "thumbnail",
            format!(
                "expected {} bytes ([3, {h}, {w}]), got {}",
                3 * plane,
                image.pixels.len()
            ),
        ));
    }
    // Photos are shrunk (Pillow's bilinear) so that the longer side is THUMBNAIL_SIDE: the
    // page stays small whatever the images.
    let (chw, h, w) = if h.max(w) > THUMBNAIL_SIDE {
        let (th, tw) = if h >= w {
            (THUMBNAIL_SIDE, (w * THUMBNAIL_SIDE / h).max(1))
        } else {
            ((h * THUMBNAIL_SIDE / w).max(1), THUMBNAIL_SIDE)
        };
        let small = crate::data::transform::resize_bilinear(&image.pixels, h, w, th, tw)?;
        (std::borrow::Cow::Owned(small), th, tw)
    } else {
        (std::borrow::Cow::Borrowed(image.pixels.as_ref()), h, w)
    };
    let plane = h * w;
    // [h, w, 3] interleaved
    let mut rgb = vec![0u8; 3 * plane];
    for i in 0..plane {
        rgb[3 * i] = chw[i];
        rgb[3 * i + 1] = chw[plane + i];
        rgb[3 * i + 2] = chw[2 * plane + i];
    }
    let side = |n: usize| {
        u32::try_from(n).map_err(|_| Error::invalid("thumbnail", format!("{n} pixels across")))
    };
    super::plots::encode_png(&rgb, side(w)?, side(h)?).map_err(|msg| Error::Plot {
        plot: "gallery thumbnail".to_string(),
        msg,
    })
}

/// The longest side of a gallery thumbnail; smaller images (CIFAR's 32×32) are kept as they
/// are.
pub const THUMBNAIL_SIDE: usize = 128;

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An SVG document made ready to sit inside HTML: the XML declaration and the namespace
/// attribute (a URI the HTML parser does not need) are dropped, and the fixed pixel size is
/// replaced by CSS so the plot scales with the page (its `viewBox` keeps the proportions).
fn inline_svg(svg: &str) -> String {
    let body = match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    };
    let Some(end) = body.find('>') else {
        return body.to_string();
    };
    let (open, rest) = body.split_at(end);
    let open = open
        .replace(" xmlns=\"http://www.w3.org/2000/svg\"", "")
        .replacen(" width=\"", " data-width=\"", 1)
        .replacen(" height=\"", " data-height=\"", 1);
    format!("{open} role=\"img\"{rest}")
}

/// A number, or a dash where there is none (NaN: a failed λ without a validated epoch).
struct Dash(f64);

impl std::fmt::Display for Dash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_finite() {
            std::fmt::Display::fmt(&self.0, f)
        } else {
            f.write_str("—")
        }
    }
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

/// Numbers with thousands separators: 10000 → "10,000".
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Flattens a JSON value into (dotted key, text) rows.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::Null => {}
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

const CSS: &str = r#"
:root{--ink:#1d2733;--muted:#5f6b7a;--line:#e2e7ee;--soft:#f5f7fa;--accent:#4e79a7;
--ok:#2f8f46;--bad:#d1495b;--card:#ffffff}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--soft);color:var(--ink);
font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif}
header{background:linear-gradient(135deg,#1f3b5a,#4e79a7);color:#fff;padding:36px 24px 78px}
header .wrap,main{max-width:1200px;margin:0 auto}
header h1{margin:0 0 4px;font-size:28px;font-weight:650;letter-spacing:-.01em}
header p{margin:0;opacity:.85}
main{padding:8px 24px 48px}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;
padding:22px 26px;margin:22px 0;box-shadow:0 1px 2px rgba(20,30,50,.04)}
h2{font-size:20px;margin:0 0 14px;font-weight:650}
h3{font-size:16px;margin:22px 0 10px;font-weight:600}
p.lead{color:var(--muted);margin:-6px 0 14px}
.warn{background:#fdecea;border:2px solid #d93025;border-radius:8px;padding:10px 14px;margin:8px 0;color:#5f1410}
.warn h2{margin:0 0 6px;font-size:18px;color:#b3261e}
tr.failed td{color:#b3261e}
.note{background:#fff8e6;border:1px solid #f3dca2;border-radius:8px;padding:10px 14px;margin:8px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:14px;margin-top:-46px}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:14px 18px;
box-shadow:0 2px 6px rgba(20,30,50,.08)}
.card .k{color:var(--muted);font-size:13px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:26px;font-weight:650;font-variant-numeric:tabular-nums}
.card .s{color:var(--muted);font-size:13px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:13px}
th:first-child,td:first-child{text-align:left}
tr.chosen td{background:#eef4fb;font-weight:600}
tr.avg td{color:var(--muted)}
table.kv td:first-child{color:var(--muted);width:30%;white-space:nowrap}
table.kv td{text-align:left;word-break:break-word}
code,pre{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:13px}
pre{background:var(--soft);border:1px solid var(--line);border-radius:8px;padding:12px;overflow:auto}
.scroll{overflow-x:auto}
.tall{max-height:520px;overflow-y:auto}
.tall thead th{position:sticky;top:0;background:var(--card)}
#confused td:nth-child(2),#confused td:nth-child(3),#confused th:nth-child(3){text-align:left}
.plots{display:grid;grid-template-columns:1fr;gap:18px}
figure{margin:0 auto;width:100%;max-width:980px;border:1px solid var(--line);border-radius:10px;padding:8px;background:#fff}
figure svg{display:block;width:100%;height:auto}
figcaption{color:var(--muted);font-size:13px;padding:6px 6px 2px}
details{margin:12px 0}
summary{cursor:pointer;color:var(--accent);font-weight:600}
table.cm td{text-align:center;min-width:44px;font-size:13px}
table.cm th{text-align:center;font-size:11px;text-transform:none;letter-spacing:0}
table.cm th.row{text-align:right}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px}
.item{border:1px solid var(--line);border-radius:10px;padding:10px;background:#fff}
.item.wrong{border-color:#f0b7bf;box-shadow:inset 3px 0 0 var(--bad)}
.item.right{box-shadow:inset 3px 0 0 var(--ok)}
.item .top{display:flex;gap:10px;align-items:center;margin-bottom:8px}
.thumb{width:96px;height:96px;image-rendering:pixelated;border-radius:4px;flex:none;background:#ddd}
.meta{font-size:13px;line-height:1.35}
.meta .idx{color:var(--muted)}
.meta b.ok{color:var(--ok)}
.meta b.bad{color:var(--bad)}
.p{display:grid;grid-template-columns:74px 1fr 38px;gap:6px;align-items:center;font-size:11.5px;line-height:1.5}
.p .n{color:var(--muted);overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.p .bar{background:var(--soft);border-radius:3px;height:8px;overflow:hidden}
.p .bar i{display:block;height:100%;background:#9fb3c8}
.p.true .n{color:var(--ok);font-weight:600}
.p.true .bar i{background:var(--ok)}
.p.pred .n{color:var(--bad);font-weight:600}
.p.pred .bar i{background:var(--bad)}
.p .v{text-align:right;font-variant-numeric:tabular-nums;color:var(--muted)}
footer{color:var(--muted);font-size:13px;text-align:center;padding:10px 0 30px}
@media (max-width:640px){section{padding:16px}header h1{font-size:22px}}
"#;

/// The whole page.
pub fn render(page: &Page) -> String {
    let mut h = String::with_capacity(1 << 20);
    let cfg = page.config;
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    h.push_str(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         img-src data:; style-src 'unsafe-inline'\">\n",
    );
    // An empty icon, so the browser does not ask for /favicon.ico.
    h.push_str("<link rel=\"icon\" href=\"data:,\">\n");
    let _ = writeln!(
        h,
        "<title>cifar-finetune report — {}</title>",
        escape(page.run_name)
    );
    let _ = writeln!(h, "<style>{CSS}</style>\n</head>\n<body>");
    let _ = writeln!(
        h,
        "<header><div class=\"wrap\"><h1>{} on frozen {} features</h1>\
         <p>Run report · <code>{}</code> · {} training and {} validation images</p></div></header>",
        escape(&dataset_title(cfg)),
        // The backbone's title (ResNet-18, Wide ResNet-50-2, …), or its name if unknown.
        escape(
            cfg.extractor
                .arch()
                .map_or(cfg.extractor.backbone.as_str(), |a| a.title)
        ),
        escape(page.run_name),
        thousands(cfg.n_train),
        thousands(cfg.n_val)
    );
    h.push_str("<main>\n");
    warnings(&mut h, page);
    headline(&mut h, page);
    for note in page.notes {
        let _ = writeln!(h, "<div class=\"note\">{}</div>", escape(note));
    }
    chosen(&mut h, page);
    configuration(&mut h, cfg);
    training(&mut h, page);
    if let Some(t) = page.test {
        test_section(&mut h, t, page.test_figures);
    }
    if let Some(v) = page.val {
        val_section(&mut h, v);
    }
    if !page.gallery.is_empty() {
        gallery(&mut h, page);
    }
    h.push_str(
        "</main>\n<footer>Written by cifar-finetune. This file is self-contained: \
                it loads nothing from anywhere.</footer>\n</body>\n</html>\n",
    );
    h
}

/// What the page's title calls the data: `source.dataset` when the run records it, CIFAR-10
/// for its class names, else the number of classes.
fn dataset_title(cfg: &RunConfig) -> String {
    if let Some(name) = cfg.source.get("dataset").and_then(|v| v.as_str()) {
        return match name {
            "cifar10" => "CIFAR-10".to_string(),
            "cifar100" => "CIFAR-100".to_string(),
            "cifar100-coarse" => "CIFAR-100 superclasses".to_string(),
            "folder" => match cfg.source.get("folder").and_then(|v| v.as_str()) {
                Some(root) => format!("Images in {root}"),
                None => "An image folder".to_string(),
            },
            other => other.to_string(),
        };
    }
    if cfg.class_names == crate::data::cifar::class_names() {
        "CIFAR-10".to_string()
    } else {
        format!("{} classes", cfg.class_names.len())
    }
}

/// The training problems of `summary.json`, first thing on the page, impossible to miss.
fn warnings(h: &mut String, page: &Page) {
    let Some(s) = page.summary else { return };
    if s.warnings.is_empty() {
        return;
    }
    h.push_str(
        "<div class=\"warn\" id=\"warnings\" role=\"alert\"><h2>Warning: the training did \
         not go well</h2><ul>",
    );
    for w in &s.warnings {
        let _ = write!(h, "<li>{}</li>", escape(w));
    }
    h.push_str("</ul></div>\n");
}

/// The scores of `test --split val`: the same numbers as the test section, for the
/// validation images the λ was chosen on.
fn val_section(h: &mut String, v: &TestMetrics) {
    h.push_str("<section id=\"validation\"><h2>Validation split</h2>");
    let _ = write!(
        h,
        "<p class=\"lead\">The checkpoint λ = {} (epoch {}) on the {} validation images \
         (<code>metrics-val.json</code>): accuracy {}, top-5 accuracy {}, loss {:.4}.</p>",
        escape(&fmt_lambda(v.lambda)),
        v.epoch,
        thousands(v.count),
        pct(v.accuracy),
        v.top5_accuracy.map_or("n/a".to_string(), pct),
        v.loss
    );
    let _ = write!(
        h,
        "<details><summary>Classification report</summary><pre>{}</pre></details>",
        escape(&v.report)
    );
    confused_pairs(h, &v.metrics, &v.class_names);
    confusion_table(h, &v.metrics.confusion, &v.class_names);
    h.push_str("</section>\n");
}

fn card(h: &mut String, key: &str, value: &str, sub: &str) {
    let _ = write!(
        h,
        "<div class=\"card\"><div class=\"k\">{}</div><div class=\"v\">{}</div>\
         <div class=\"s\">{}</div></div>",
        escape(key),
        escape(value),
        escape(sub)
    );
}

fn headline(h: &mut String, page: &Page) {
    h.push_str("<div class=\"cards\">");
    if let Some(t) = page.test {
        card(
            h,
            "test accuracy",
            &pct(t.accuracy),
            &format!("{} test images", thousands(t.count)),
        );
        card(
            h,
            "test loss",
            &format!("{:.4}", t.loss),
            "mean cross-entropy",
        );
    }
    if let Some(s) = page.summary {
        let best = s.lambdas.iter().find(|l| l.lambda == s.chosen_lambda);
        card(
            h,
            "chosen λ",
            &fmt_lambda(s.chosen_lambda),
            &format!("by validation {}", select_name(s)),
        );
        if let Some(b) = best {
            card(
                h,
                "validation accuracy",
                &pct(b.best_val_accuracy),
                &format!("best epoch {} of {}", b.best_epoch, b.epochs),
            );
        }
    }
    card(
        h,
        "λ values tried",
        &page.config.lambdas.len().to_string(),
        &format!(
            "{} · {} epochs each",
            cfg_lambdas(page.config),
            page.config.train.epochs
        ),
    );
    h.push_str("</div>\n");
}

fn select_name(s: &Summary) -> String {
    serde_json::to_value(s.select)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", s.select).to_lowercase())
}

fn cfg_lambdas(cfg: &RunConfig) -> String {
    cfg.lambdas
        .iter()
        .map(|&l| fmt_lambda(l))
        .collect::<Vec<_>>()
        .join(", ")
}

fn chosen(h: &mut String, page: &Page) {
    let Some(s) = page.summary else { return };
    h.push_str("<section id=\"lambda\"><h2>The chosen λ</h2>");
    let _ = write!(
        h,
        "<p class=\"lead\">Each λ keeps its best epoch by validation {sel}; the λ whose best \
         epoch is best is chosen: <b>λ = {l}</b> (<code>{ck}</code>). The test set plays no \
         part in the choice.</p>",
        sel = escape(&select_name(s)),
        l = escape(&fmt_lambda(s.chosen_lambda)),
        ck = escape(&s.chosen_checkpoint)
    );
    h.push_str(
        "<div class=\"scroll\"><table><thead><tr><th>λ</th><th>best epoch</th>\
         <th>validation loss</th><th>validation accuracy</th><th>final training loss</th>\
         <th>epochs</th><th>status</th></tr></thead><tbody>",
    );
    for l in &s.lambdas {
        let class = if l.failed {
            " class=\"failed\""
        } else if l.lambda == s.chosen_lambda {
            " class=\"chosen\""
        } else {
            ""
        };
        let status = if l.failed {
            "failed: diverged".to_string()
        } else if l.problems.is_empty() {
            "ok".to_string()
        } else {
            let kinds: Vec<&str> = l.problems.iter().map(|p| p.kind.label()).collect();
            format!("warning: {}", kinds.join(", "))
        };
        let _ = write!(
            h,
            "<tr{class}><td>{}</td><td>{}</td><td>{:.4}</td><td>{}</td><td>{:.4}</td><td>{}</td>\
             <td>{}</td></tr>",
            escape(&fmt_lambda(l.lambda)),
            l.best_epoch,
            Dash(l.best_val_loss),
            if l.best_val_accuracy.is_finite() {
                pct(l.best_val_accuracy)
            } else {
                "—".to_string()
            },
            Dash(l.final_train_loss),
            l.epochs,
            escape(&status)
        );
    }
    h.push_str("</tbody></table></div></section>\n");
}

fn configuration(h: &mut String, cfg: &RunConfig) {
    h.push_str("<section id=\"config\"><h2>Configuration and fingerprints</h2>");
    h.push_str(
        "<p class=\"lead\">Everything that determines the numbers of this run \
         (<code>config.json</code>).</p><table class=\"kv\"><tbody>",
    );
    let t = &cfg.train;
    let rows: Vec<(String, String)> = vec![
        ("λ values (L2 strength)".into(), cfg_lambdas(cfg)),
        ("learning rate".into(), t.lr.to_string()),
        ("momentum".into(), t.momentum.to_string()),
        ("batch size".into(), t.batch_size.to_string()),
        ("epochs".into(), t.epochs.to_string()),
        ("validate every".into(), format!("{} epoch(s)", t.val_every)),
        ("seed".into(), t.seed.to_string()),
        (
            "head".into(),
            format!(
                "{} → {} → {} → {}, dropout {}",
                cfg.feature_dim,
                t.hidden,
                match t.activation {
                    Activation::Relu => "ReLU",
                    Activation::None => "no activation",
                },
                cfg.classes,
                t.dropout
            ),
        ),
        (
            "images".into(),
            format!(
                "{} training, {} validation",
                thousands(cfg.n_train),
                thousands(cfg.n_val)
            ),
        ),
    ];
    for (k, v) in &rows {
        let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(v));
    }
    let _ = write!(
        h,
        "<tr><td>weights sha256</td><td><code>{}</code></td></tr>",
        escape(&cfg.extractor.weights_sha256)
    );
    let _ = write!(
        h,
        "<tr><td>feature extractor</td><td><code>{}</code></td></tr>\
         <tr><td>train/validation split digest</td><td><code>{}</code></td></tr>",
        escape(&cfg.extractor.to_string()),
        escape(&cfg.split_digest)
    );
    let mut source = Vec::new();
    flatten("", &cfg.source, &mut source);
    for (k, v) in &source {
        let _ = write!(
            h,
            "<tr><td>source: {}</td><td><code>{}</code></td></tr>",
            escape(k),
            escape(v)
        );
    }
    let mut options = Vec::new();
    flatten("", &cfg.options, &mut options);
    for (k, v) in &options {
        let _ = write!(
            h,
            "<tr><td>option: {}</td><td><code>{}</code></td></tr>",
            escape(k),
            escape(v)
        );
    }
    h.push_str("</tbody></table></section>\n");
}

/// Widest figure shown scaled to the page; wider ones keep their own size and scroll.
const FIGURE_WIDTH: u32 = 980;

fn figures(h: &mut String, figs: &[Figure]) {
    h.push_str("<div class=\"plots\">");
    for f in figs {
        // A large figure (the heat map of many classes) scaled down to the page would make
        // its labels too small to read: it keeps its size, in a box that scrolls sideways.
        let wide = f.width > FIGURE_WIDTH;
        if wide {
            h.push_str("<div class=\"scroll\">");
        }
        let style = if wide {
            format!(" style=\"max-width:none;width:{}px\"", f.width + 18)
        } else {
            String::new()
        };
        let _ = write!(
            h,
            "<figure{style}>{}<figcaption>{} · <code>plots/{}.png</code>, <code>.svg</code></figcaption></figure>",
            inline_svg(&f.svg),
            escape(&f.title),
            escape(&f.name)
        );
        if wide {
            h.push_str("</div>");
        }
    }
    h.push_str("</div>\n");
}

fn training(h: &mut String, page: &Page) {
    if page.training_figures.is_empty() {
        return;
    }
    h.push_str("<section id=\"training\"><h2>Training</h2>");
    h.push_str(
        "<p class=\"lead\">Training loss is the mean cross-entropy over each epoch's samples as \
         they were trained on (the L2 penalty λ/2·(‖W₁‖²+‖W₂‖²) is logged apart); validation \
         loss is measured after the epoch. On the λ axes the scale is logarithmic; λ = 0, which \
         has no logarithm, is drawn one decade left of the smallest λ &gt; 0, beyond a dashed \
         break.</p>",
    );
    figures(h, page.training_figures);
    h.push_str("</section>\n");
}

fn test_section(h: &mut String, t: &TestMetrics, figs: &[Figure]) {
    let m = &t.metrics;
    h.push_str("<section id=\"test\"><h2>Test set</h2>");
    let _ = write!(
        h,
        "<p class=\"lead\">The chosen checkpoint (λ = {}, epoch {}) on {} test images: \
         accuracy {}, top-5 accuracy {}, loss {:.4}.</p>",
        escape(&fmt_lambda(t.lambda)),
        t.epoch,
        thousands(t.count),
        pct(t.accuracy),
        t.top5_accuracy.map_or("n/a".to_string(), pct),
        t.loss
    );
    let many = m.classes.len() > MANY_CLASSES;
    h.push_str("<h3>Classification report</h3>");
    if many {
        let _ = write!(
            h,
            "<p class=\"lead\">{} classes, sorted by recall (the accuracy on the class's \
             images), worst first.</p>",
            m.classes.len()
        );
    }
    // Many rows scroll in a box of their own, so the figures below stay in reach.
    h.push_str(if many {
        "<div class=\"scroll tall\">"
    } else {
        "<div class=\"scroll\">"
    });
    h.push_str(
        "<table id=\"per-class\"><thead><tr>\
                <th>class</th><th>precision</th><th>recall (accuracy)</th><th>F1</th>\
                <th>support</th></tr></thead><tbody>",
    );
    let order: Vec<usize> = if many {
        m.classes_by_recall()
    } else {
        (0..m.classes.len()).collect()
    };
    for c in order.iter().map(|&i| &m.classes[i]) {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
            escape(&c.name),
            c.precision,
            c.recall,
            c.f1,
            c.support
        );
    }
    let _ = write!(
        h,
        "<tr class=\"avg\"><td>accuracy</td><td></td><td></td><td>{:.3}</td><td>{}</td></tr>",
        m.accuracy, m.total
    );
    for (name, a) in [
        ("macro avg", &m.macro_avg),
        ("weighted avg", &m.weighted_avg),
    ] {
        let _ = write!(
            h,
            "<tr class=\"avg\"><td>{name}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
            a.precision, a.recall, a.f1, a.support
        );
    }
    h.push_str("</tbody></table></div>");
    let _ = write!(
        h,
        "<details><summary>As scikit-learn prints it</summary><pre>{}</pre></details>",
        escape(&t.report)
    );
    confused_pairs(h, m, &t.class_names);
    h.push_str("<h3>Confusion matrix and per-class accuracy</h3>");
    figures(h, figs);
    confusion_table(h, &m.confusion, &t.class_names);
    h.push_str("</section>\n");
}

/// How many pairs [`confused_pairs`] lists.
const CONFUSED_PAIRS: usize = 10;

/// The most confused pairs of classes: true class → predicted class, images, share of the
/// true class's images.
fn confused_pairs(h: &mut String, m: &crate::metrics::Metrics, names: &[String]) {
    let pairs = m.most_confused(CONFUSED_PAIRS);
    let name = |c: usize| names.get(c).map_or("?", String::as_str);
    h.push_str("<h3>Most confused classes</h3>");
    if pairs.is_empty() {
        h.push_str("<p class=\"lead\">No image was misclassified.</p>");
        return;
    }
    let _ = write!(
        h,
        "<p class=\"lead\">The {} largest cells off the diagonal of the confusion matrix: \
         images of the true class predicted as another.</p>",
        pairs.len()
    );
    h.push_str(
        "<div class=\"scroll\"><table id=\"confused\"><thead><tr><th>true class</th><th></th>\
         <th>predicted class</th><th>images</th><th>share of the true class</th></tr></thead>\
         <tbody>",
    );
    for p in &pairs {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>→</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(name(p.true_class)),
            escape(name(p.predicted)),
            p.count,
            pct(p.share)
        );
    }
    h.push_str("</tbody></table></div>");
}

/// The confusion matrix as an HTML table, each cell shaded by its share of the row; beyond
/// [`MANY_CLASSES`] classes a pointer to `metrics.json` instead (a 100×100 table reads no
/// better than the heat map and weighs more than the rest of the page).
fn confusion_table(h: &mut String, confusion: &[Vec<u64>], names: &[String]) {
    if names.len() > MANY_CLASSES {
        let _ = write!(
            h,
            "<p class=\"lead\">With {} classes the counts are left out of the heat map; \
             every count is in <code>metrics.json</code> (<code>metrics.confusion</code>, rows \
             true class, columns predicted).</p>",
            names.len()
        );
        return;
    }
    h.push_str(
        "<details><summary>Confusion matrix as a table (rows: true class, columns: \
         predicted)</summary><div class=\"scroll\"><table class=\"cm\"><thead><tr><th></th>",
    );
    for n in names {
        let _ = write!(h, "<th>{}</th>", escape(n));
    }
    h.push_str("</tr></thead><tbody>");
    for (i, row) in confusion.iter().enumerate() {
        let total: u64 = row.iter().sum();
        let name = names.get(i).map_or("", String::as_str);
        let _ = write!(h, "<tr><th class=\"row\">{}</th>", escape(name));
        for &c in row {
            let share = if total > 0 {
                c as f64 / total as f64
            } else {
                0.0
            };
            let ink = if share > 0.5 { "#fff" } else { "inherit" };
            let _ = write!(
                h,
                "<td style=\"background:rgba(33,113,181,{:.3});color:{ink}\">{c}</td>",
                share
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table></div></details>");
}

fn gallery(h: &mut String, page: &Page) {
    let names: Vec<String> = page.test.map_or_else(
        || page.config.class_names.clone(),
        |t| t.class_names.clone(),
    );
    let name = |c: u8| names.get(c as usize).map_or("?", String::as_str);
    h.push_str("<section id=\"gallery\"><h2>Test images</h2>");
    let shown_wrong = page
        .gallery
        .iter()
        .filter(|g| g.predicted != g.true_class)
        .count();
    let counts = match page.gallery_counts {
        Some((wrong, total)) => format!(
            " Of the {} test images, {} are misclassified; {} of them are shown.",
            thousands(total),
            thousands(wrong),
            thousands(shown_wrong)
        ),
        None => String::new(),
    };
    let _ = write!(
        h,
        "<p class=\"lead\">Misclassified images first (most confident mistakes first), then \
         correct ones (least confident first). Each bar is the probability of a class: \
         <span style=\"color:var(--ok);font-weight:600\">true class</span>, \
         <span style=\"color:var(--bad);font-weight:600\">wrong prediction</span>{}.{}</p>",
        if page
            .gallery
            .first()
            .is_some_and(|g| g.probabilities.len() > MANY_CLASSES)
        {
            format!(" (with this many classes, the {CARD_TOP} most probable and the true class)")
        } else {
            String::new()
        },
        escape(&counts)
    );
    h.push_str("<div class=\"gallery\">");
    for g in page.gallery {
        let wrong = g.predicted != g.true_class;
        let _ = write!(
            h,
            "<div class=\"item {}\"><div class=\"top\"><img class=\"thumb\" alt=\"test image {}\" \
             src=\"data:image/png;base64,{}\"><div class=\"meta\"><span class=\"idx\">#{}</span><br>\
             true <b class=\"ok\">{}</b><br>predicted <b class=\"{}\">{}</b></div></div>",
            if wrong { "wrong" } else { "right" },
            g.index,
            BASE64_STANDARD.encode(&g.png),
            g.index,
            escape(name(g.true_class)),
            if wrong { "bad" } else { "ok" },
            escape(name(g.predicted))
        );
        for (c, p) in card_classes(&g.probabilities, g.true_class) {
            let class = if c == g.true_class as usize {
                " true"
            } else if c == g.predicted as usize {
                " pred"
            } else {
                ""
            };
            let p = f64::from(p).clamp(0.0, 1.0);
            let _ = write!(
                h,
                "<div class=\"p{class}\"><span class=\"n\">{}</span><span class=\"bar\">\
                 <i style=\"width:{:.1}%\"></i></span><span class=\"v\">{:.0}%</span></div>",
                escape(name(c as u8)),
                p * 100.0,
                p * 100.0
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</div></section>\n");
}

/// The classes most probable first, shown on a gallery card beyond [`MANY_CLASSES`].
const CARD_TOP: usize = 5;

/// The (class, probability) bars of a gallery card: every class in class order, or, beyond
/// [`MANY_CLASSES`] classes (100 bars per card would make the page megabytes), the
/// [`CARD_TOP`] most probable and the true class, most probable first.
fn card_classes(probabilities: &[f32], true_class: u8) -> Vec<(usize, f32)> {
    if probabilities.len() <= MANY_CLASSES {
        return probabilities.iter().copied().enumerate().collect();
    }
    let mut shown = crate::metrics::top_classes(probabilities, CARD_TOP);
    let t = usize::from(true_class);
    if !shown.iter().any(|&(c, _)| c == t)
        && let Some(&p) = probabilities.get(t)
    {
        shown.push((t, p));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_shows_every_class_or_the_top_five_and_the_true_one() {
        let few: Vec<f32> = (0..10).map(|c| c as f32 / 45.0).collect();
        assert_eq!(card_classes(&few, 3).len(), 10);
        let mut many = vec![0.001f32; 100];
        for (c, p) in [
            (40, 0.5),
            (7, 0.2),
            (93, 0.1),
            (2, 0.05),
            (61, 0.04),
            (8, 0.03),
        ] {
            many[c] = p;
        }
        let shown: Vec<usize> = card_classes(&many, 77).iter().map(|&(c, _)| c).collect();
        assert_eq!(shown, vec![40, 7, 93, 2, 61, 77]);
        let shown: Vec<usize> = card_classes(&many, 93).iter().map(|&(c, _)| c).collect();
        assert_eq!(shown, vec![40, 7, 93, 2, 61]);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn svg_is_made_inline() {
        let svg = "<?xml version=\"1.0\"?>\n<svg width=\"10\" height=\"20\" viewBox=\"0 0 10 20\" \
                   xmlns=\"http://www.w3.org/2000/svg\">\n<rect/></svg>";
        let s = inline_svg(svg);
        assert!(s.starts_with("<svg data-width=\"10\" data-height=\"20\" viewBox"));
        assert!(!s.contains("http"));
        assert!(s.contains("role=\"img\">\n<rect/>"));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(10000), "10,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    fn pred(index: u32, t: u8, p: u8, conf: f32) -> PredictionRow {
        let mut probabilities = vec![(1.0 - conf) / 9.0; 10];
        probabilities[p as usize] = conf;
        PredictionRow {
            index,
            true_class: t,
            predicted: p,
            probabilities,
        }
    }

    #[test]
    fn gallery_puts_mistakes_first_and_keeps_some_correct() {
        let mut rows = Vec::new();
        for i in 0..20u32 {
            // Even: wrong with rising confidence; odd: right with rising confidence.
            if i % 2 == 0 {
                rows.push(pred(i, 1, 2, 0.3 + i as f32 * 0.02));
            } else {
                rows.push(pred(i, 3, 3, 0.3 + i as f32 * 0.02));
            }
        }
        let sel = select_gallery(&rows, 8);
        assert_eq!(sel.len(), 8);
        // 6 mistakes (most confident first), then 2 correct (least confident first).
        let idx: Vec<u32> = sel.iter().map(|&i| rows[i].index).collect();
        assert_eq!(idx, vec![18, 16, 14, 12, 10, 8, 1, 3]);
        // Few mistakes: all of them, the rest filled with correct ones.
        let few: Vec<PredictionRow> = rows.iter().filter(|r| r.index != 0).cloned().collect();
        assert_eq!(select_gallery(&few[..5], 100).len(), 5);
        assert!(select_gallery(&rows, 0).is_empty());
    }
}
