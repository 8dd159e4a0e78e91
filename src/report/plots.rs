//! The report's plots, each rendered twice from the same drawing code: a PNG (plotters'
//! bitmap backend, encoded by the `image` crate) and an SVG (plotters' SVG backend).
//!
//! Text in the PNGs is drawn with DejaVu Sans, embedded in the binary
//! (`assets/fonts/DejaVuSans.ttf`, licence beside it) and registered with plotters' `ab_glyph`
//! backend, so the plots read the same on a fresh machine whatever fonts it has. The SVGs name
//! the generic `sans-serif` family and leave glyphs to the viewer; plotters anchors SVG text
//! (`text-anchor`), so another font's metrics do not misplace it.
//!
//! ## λ on a log axis
//!
//! The L2 strengths of a sweep span decades (`0, 1e-4, …, 1e-1`), so λ is drawn on a log axis
//! — but λ = 0, the unregularised baseline, has no logarithm. It is placed one decade left of
//! the smallest positive λ, with its own tick labelled `0` and a dashed line marking the axis
//! break between them (a "symlog"-style axis without a linear stretch).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{LambdaAccuracies, fmt_lambda, mean_std};
use crate::error::{Error, Result};
use crate::rundir::HistoryRow;

/// DejaVu Sans 2.37 (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The family every plot's text uses: the embedded font is registered under this name.
const FAMILY: &str = "sans-serif";

/// Ten distinguishable colours (Tableau 10), one per λ or per series.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];

/// Dark grey for text and axes (softer than pure black).
const INK: RGBColor = RGBColor(0x33, 0x33, 0x33);

/// One plot, rendered as PNG and SVG.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// File stem, e.g. `train_loss` (written as `train_loss.png` and `train_loss.svg`).
    pub name: String,
    /// Human-readable title (also drawn on the plot).
    pub title: String,
    /// The PNG file's bytes.
    pub png: Vec<u8>,
    /// The SVG document.
    pub svg: String,
    /// Width of the drawing, in pixels (the PNG's, and the SVG's before scaling).
    pub width: u32,
    /// Height of the drawing, in pixels.
    pub height: u32,
}

impl Figure {
    /// Writes `<dir>/<name>.png` and `<dir>/<name>.svg` atomically; returns both paths.
    pub fn write(&self, dir: &Path) -> Result<[PathBuf; 2]> {
        let png = dir.join(format!("{}.png", self.name));
        let svg = dir.join(format!("{}.svg", self.name));
        crate::io::atomic_write_bytes(&png, &self.png)?;
        crate::io::atomic_write_bytes(&svg, self.svg.as_bytes())?;
        Ok([png, svg])
    }
}

/// Which loss [`loss_curves`] draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    /// The training cross-entropy (without the penalty), one value per epoch.
    Train,
    /// The validation cross-entropy, on validated epochs only.
    Val,
}

/// Loss against epoch, one line per λ, from one run's history.
/// Errors if the history has no value of that kind.
pub fn loss_curves(history: &[HistoryRow], kind: LossKind) -> Result<Figure> {
    let (name, title, what) = match kind {
        LossKind::Train => ("train_loss", "Training loss", "training"),
        LossKind::Val => ("val_loss", "Validation loss", "validation"),
    };
    let mut series = Vec::new();
    for (lambda, rows) in super::by_lambda(history) {
        let mut points: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| {
                let v = match kind {
                    LossKind::Train => Some(r.train_loss),
                    LossKind::Val => r.val_loss,
                };
                v.filter(|v| v.is_finite()).map(|v| (r.epoch as f64, v))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !points.is_empty() {
            series.push((format!("λ = {}", fmt_lambda(lambda)), points));
        }
    }
    if series.is_empty() {
        return Err(Error::invalid(
            "history",
            format!("no finite {what} loss to plot"),
        ));
    }
    let plot = LinePlot {
        title: title.to_string(),
        x_desc: "epoch".to_string(),
        y_desc: format!("{what} cross-entropy"),
        series,
    };
    render(name, title, (960, 600), &plot)
}

/// The original report's error-bar plot: for each λ, the mean ± standard deviation over the
/// epochs (population std, numpy's default) of the training losses and of the validation
/// losses, against λ on a log axis (λ = 0 set apart on the left).
pub fn loss_error_bars(history: &[HistoryRow]) -> Result<Figure> {
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (lambda, rows) in super::by_lambda(history) {
        let t: Vec<f64> = rows
            .iter()
            .map(|r| r.train_loss)
            .filter(|v| v.is_finite())
            .collect();
        let v: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.val_loss)
            .filter(|v| v.is_finite())
            .collect();
        if let Some((m, s)) = mean_std(&t, 0) {
            train.push((lambda, m, s));
        }
        if let Some((m, s)) = mean_std(&v, 0) {
            val.push((lambda, m, s));
        }
    }
    if train.is_empty() && val.is_empty() {
        return Err(Error::invalid("history", "no finite loss to plot"));
    }
    let lambdas: Vec<f32> = train.iter().chain(&val).map(|p| p.0).collect();
    let axis = LambdaAxis::new(&lambdas)?;
    let plot = ErrorBarPlot {
        title: "Loss over the epochs, per λ (mean ± std)".to_string(),
        y_desc: "cross-entropy".to_string(),
        axis,
        series: vec![
            ("training loss".to_string(), train),
            ("validation loss".to_string(), val),
        ],
        points: Vec::new(),
        y_percent: false,
    };
    render("loss_error_bars", &plot.title.clone(), (960, 600), &plot)
}

/// The final validation accuracy of K seeds per λ: mean ± sample standard deviation (n − 1)
/// against λ, every seed's value drawn as a dot. The spread across seeds says which
/// differences between λ values are larger than the luck of the initialisation.
pub fn accuracy_spread(runs: &[LambdaAccuracies]) -> Result<Figure> {
    let mut means = Vec::new();
    let mut points = Vec::new();
    let mut max_k = 0;
    for run in runs {
        let acc: Vec<f64> = run
            .accuracies
            .iter()
            .copied()
            .filter(|a| a.is_finite())
            .collect();
        let ddof = usize::from(acc.len() > 1);
        if let Some((m, s)) = mean_std(&acc, ddof) {
            means.push((run.lambda, m, s));
            points.extend(acc.iter().map(|&a| (run.lambda, a)));
            max_k = max_k.max(acc.len());
        }
    }
    if means.is_empty() {
        return Err(Error::invalid(
            "accuracies",
            "no final validation accuracy to plot",
        ));
    }
    let lambdas: Vec<f32> = means.iter().map(|p| p.0).collect();
    let axis = LambdaAxis::new(&lambdas)?;
    let title = format!("Final validation accuracy over {max_k} seeds (mean ± std)");
    let plot = ErrorBarPlot {
        title: title.clone(),
        y_desc: "validation accuracy".to_string(),
        axis,
        series: vec![("mean ± std across seeds".to_string(), means)],
        points,
        y_percent: true,
    };
    render("accuracy_spread", &title, (960, 600), &plot)
}

/// Largest class count for which the heat map writes each cell's count and the per-class
/// plot keeps class order; beyond it the cells are colour only (a 100×100 grid of numbers
/// is unreadable) and the per-class bars are sorted, worst first.
pub const MANY_CLASSES: usize = 20;

/// The confusion matrix (rows: true class, columns: predicted class) as a heat map with the
/// count in every cell (up to [`MANY_CLASSES`] classes; colour only beyond); the colour is
/// the cell's share of its row, so classes of different sizes compare. `classes` names the
/// rows and columns in order. The figure grows with the class count and the length of the
/// names, so that every name stays legible (column names turn vertical when they do not fit
/// across two columns).
pub fn confusion_heatmap(confusion: &[Vec<u64>], classes: &[String]) -> Result<Figure> {
    check_square(confusion, classes)?;
    let total: u64 = confusion.iter().flatten().sum();
    let title = format!("Confusion matrix (test set, {total} images)");
    let plot = Heatmap {
        title: title.clone(),
        confusion: confusion.to_vec(),
        classes: classes.to_vec(),
        layout: HeatmapLayout::new(classes),
    };
    let size = (plot.layout.width as u32, plot.layout.height as u32);
    render("confusion_matrix", &title, size, &plot)
}

/// Per-class accuracy (recall: the diagonal over the row sum) as horizontal bars, with the
/// overall accuracy as a dashed line. Classes keep their order up to [`MANY_CLASSES`];
/// beyond, they are sorted worst first (classes without test images last), and the figure
/// grows to keep a legible row per class.
pub fn per_class_accuracy(confusion: &[Vec<u64>], classes: &[String]) -> Result<Figure> {
    check_square(confusion, classes)?;
    let mut values = Vec::with_capacity(classes.len());
    let (mut correct, mut total) = (0u64, 0u64);
    for (i, row) in confusion.iter().enumerate() {
        let n: u64 = row.iter().sum();
        correct += row[i];
        total += n;
        values.push((n > 0).then(|| row[i] as f64 / n as f64));
    }
    let overall = (total > 0).then(|| correct as f64 / total as f64);
    let n = classes.len();
    let mut order: Vec<usize> = (0..n).collect();
    let sorted = n > MANY_CLASSES;
    if sorted {
        // Worst first; a class without test images has no accuracy and goes last.
        order.sort_by(|&a, &b| {
            let key = |i: usize| values[i].unwrap_or(f64::INFINITY);
            key(a).total_cmp(&key(b))
        });
    }
    let title = if sorted {
        "Accuracy per class (test set), worst first".to_string()
    } else {
        "Accuracy per class (test set)".to_string()
    };
    let (label_size, value_size) = if n > MANY_CLASSES { (12, 11) } else { (15, 14) };
    let height = match n {
        0..=10 => 560,
        11..=MANY_CLASSES => 140 + 22 * n as u32,
        _ => 140 + 16 * n as u32,
    };
    let widest = classes
        .iter()
        .map(|c| text_width(c, label_size))
        .max()
        .unwrap_or(0);
    let plot = Bars {
        title: title.clone(),
        classes: order.iter().map(|&i| classes[i].clone()).collect(),
        values: order.iter().map(|&i| values[i]).collect(),
        overall,
        label_size,
        value_size,
        label_area: (widest + 16).max(120) as u32,
    };
    render("per_class_accuracy", &title, (900, height), &plot)
}

/// A generous estimate of the width of `text` in pixels at `size` px of DejaVu Sans (its
/// lowercase letters average about 0.55 em), for laying out labels before drawing them.
fn text_width(text: &str, size: u32) -> i32 {
    (text.chars().count() as f64 * f64::from(size) * 0.62).ceil() as i32
}

fn check_square(confusion: &[Vec<u64>], classes: &[String]) -> Result<()> {
    let n = classes.len();
    if n == 0 || confusion.len() != n || confusion.iter().any(|r| r.len() != n) {
        return Err(Error::invalid(
            "confusion matrix",
            format!(
                "expected {n}×{n} counts for {n} class names, got {} rows of lengths {:?}",
                confusion.len(),
                confusion.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        ));
    }
    Ok(())
}

/// Registers the embedded font with plotters once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::Plot {
            plot: "all plots".to_string(),
            msg: "the embedded DejaVu Sans font could not be parsed".to_string(),
        })
    }
}

/// The error type of a drawing function, generic over the backend.
type DrawError = Box<dyn std::error::Error + Send + Sync>;

/// Something that can draw itself on any plotters backend.
trait Draw {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError>
    where
        DB::ErrorType: 'static;
}

/// Draws `plot` on an SVG and on a bitmap of `size` pixels, and encodes the bitmap as PNG.
fn render<P: Draw>(name: &str, title: &str, size: (u32, u32), plot: &P) -> Result<Figure> {
    ensure_font()?;
    let fail = |msg: String| Error::Plot {
        plot: name.to_string(),
        msg,
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        plot.draw(&root).map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    // [h, w, 3] RGB
    let mut rgb = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        plot.draw(&root).map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let png = encode_png(&rgb, size.0, size.1).map_err(fail)?;
    Ok(Figure {
        name: name.to_string(),
        title: title.to_string(),
        png,
        svg,
        width: size.0,
        height: size.1,
    })
}

/// PNG bytes of an interleaved RGB buffer (`[h, w, 3]`).
pub(crate) fn encode_png(rgb: &[u8], w: u32, h: u32) -> std::result::Result<Vec<u8>, String> {
    let img = image::RgbImage::from_raw(w, h, rgb.to_vec())
        .ok_or_else(|| format!("buffer of {} bytes is not {w}×{h} RGB", rgb.len()))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| format!("encoding PNG: {e}"))?;
    Ok(out.into_inner())
}

fn font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&INK)
}

fn title_style() -> TextStyle<'static> {
    (FAMILY, 24).into_font().color(&INK)
}

/// Lower and upper y bounds around `values`, padded by 6 % of their span below and by
/// `6 % + legend_rows × 6 %` above, so the legend in the upper corner sits over empty space.
fn padded_range(values: impl Iterator<Item = f64>, legend_rows: usize) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.06
    } else {
        lo.abs().max(1.0) * 0.05
    };
    (lo - pad, hi + pad * (1.0 + legend_rows as f64))
}

/// Lines against epoch.
struct LinePlot {
    title: String,
    x_desc: String,
    y_desc: String,
    /// (legend label, (epoch, value) points in epoch order)
    series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Draw for LinePlot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError>
    where
        DB::ErrorType: 'static,
    {
        let xs = self.series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
        let (x_lo, x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        let (x_lo, x_hi) = if x_hi > x_lo {
            (x_lo, x_hi)
        } else {
            (x_lo - 1.0, x_hi + 1.0)
        };
        let (y_lo, y_hi) = padded_range(
            self.series.iter().flat_map(|s| s.1.iter().map(|p| p.1)),
            self.series.len(),
        );
        // Integer epochs as ticks when there are few; plotters' own choice otherwise.
        let span = (x_hi - x_lo).round() as usize;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, title_style())
            .margin(20)
            .x_label_area_size(56)
            .y_label_area_size(80)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_desc)
            .y_desc(&self.y_desc)
            .x_labels(span.clamp(2, 12) + 1)
            .y_labels(8)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-9 {
                    format!("{}", x.round())
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.2}"))
            .label_style(font(15))
            .axis_desc_style(font(17))
            .axis_style(INK.mix(0.6))
            .bold_line_style(INK.mix(0.12))
            .light_line_style(TRANSPARENT)
            .draw()?;
        let single_point = self.series.iter().all(|s| s.1.len() < 2);
        for (i, (label, points)) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let style = color.stroke_width(3);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), style))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            let radius = if single_point { 5 } else { 3 };
            chart.draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, radius, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(font(15))
            .background_style(WHITE.mix(0.9))
            .border_style(INK.mix(0.3))
            .margin(12)
            .draw()?;
        Ok(())
    }
}

/// A linear f64 axis whose ticks sit exactly at given values (plotters' own `WithKeyPoints`
/// cannot take a label formatter in 0.3.7).
struct Ticked {
    lo: f64,
    hi: f64,
    keys: Vec<f64>,
}

impl Ticked {
    fn new(lo: f64, hi: f64, keys: Vec<f64>) -> Self {
        Ticked { lo, hi, keys }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    /// The same linear mapping as plotters' `RangedCoordf64`.
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        if self.hi == self.lo {
            return (limit.1 - limit.0) / 2;
        }
        let t = (v - self.lo) / (self.hi - self.lo);
        let len = f64::from(limit.1 - limit.0);
        if len >= 0.0 {
            limit.0 + (len * t + 1e-3).floor() as i32
        } else {
            limit.0 + (len * t - 1e-3).ceil() as i32
        }
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Every key when there is room, else every k-th one.
        let max = hint.max_num_points().max(1);
        let step = self.keys.len().div_ceil(max).max(1);
        self.keys.iter().copied().step_by(step).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// The λ axis: log10 for λ > 0, λ = 0 one decade left of the smallest positive λ.
#[derive(Debug, Clone)]
struct LambdaAxis {
    /// (position on the axis, λ) of every distinct λ, ascending.
    ticks: Vec<(f64, f32)>,
    /// Where λ = 0 sits, if it is present.
    zero: Option<f64>,
    /// The dashed break between λ = 0 and the positive λ values, if both are present.
    break_at: Option<f64>,
}

impl LambdaAxis {
    fn new(lambdas: &[f32]) -> Result<Self> {
        let mut ls: Vec<f32> = Vec::new();
        for &l in lambdas {
            if !(l.is_finite() && l >= 0.0) {
                return Err(Error::invalid(
                    "lambda",
                    format!("{l} cannot be plotted: λ must be finite and ≥ 0"),
                ));
            }
            if !ls.contains(&l) {
                ls.push(l);
            }
        }
        ls.sort_by(f32::total_cmp);
        let log = |l: f32| f64::from(l).log10();
        let smallest_positive = ls.iter().copied().find(|&l| l > 0.0);
        let zero_pos = smallest_positive.map_or(0.0, |l| log(l) - 1.0);
        let ticks: Vec<(f64, f32)> = ls
            .iter()
            .map(|&l| (if l > 0.0 { log(l) } else { zero_pos }, l))
            .collect();
        let has_zero = ls.first() == Some(&0.0);
        let break_at = match (has_zero, smallest_positive) {
            (true, Some(l)) => Some((zero_pos + log(l)) / 2.0),
            _ => None,
        };
        Ok(LambdaAxis {
            ticks,
            zero: has_zero.then_some(zero_pos),
            break_at,
        })
    }

    fn pos(&self, lambda: f32) -> f64 {
        if lambda > 0.0 {
            f64::from(lambda).log10()
        } else {
            self.zero.unwrap_or(0.0)
        }
    }

    /// The axis range, half a decade beyond the outer ticks.
    fn range(&self) -> (f64, f64) {
        let lo = self.ticks.first().map_or(0.0, |t| t.0);
        let hi = self.ticks.last().map_or(0.0, |t| t.0);
        (lo - 0.5, hi + 0.5)
    }

    /// The λ label of the tick nearest to `pos`.
    fn label(&self, pos: f64) -> String {
        self.ticks
            .iter()
            .min_by(|a, b| (a.0 - pos).abs().total_cmp(&(b.0 - pos).abs()))
            .map_or_else(String::new, |t| fmt_lambda(t.1))
    }

    fn desc(&self) -> &'static str {
        if self.break_at.is_some() {
            "L2 strength λ (log scale; λ = 0 set apart on the left)"
        } else {
            "L2 strength λ (log scale)"
        }
    }
}

/// (λ, mean, std) of one series at one λ.
type LambdaStat = (f32, f64, f64);

/// Means with ± std error bars against λ, plus optional individual points.
struct ErrorBarPlot {
    title: String,
    y_desc: String,
    axis: LambdaAxis,
    /// (legend label, (λ, mean, std) per λ)
    series: Vec<(String, Vec<LambdaStat>)>,
    /// (λ, value): individual observations drawn as hollow dots beside the bars.
    points: Vec<(f32, f64)>,
    y_percent: bool,
}

impl Draw for ErrorBarPlot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError>
    where
        DB::ErrorType: 'static,
    {
        let (x_lo, x_hi) = self.axis.range();
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.1.iter().flat_map(|p| [p.1 - p.2, p.1 + p.2]))
            .chain(self.points.iter().map(|p| p.1));
        let legend_rows = self.series.len() + usize::from(!self.points.is_empty());
        let (y_lo, y_hi) = padded_range(ys, legend_rows);
        let keys: Vec<f64> = self.axis.ticks.iter().map(|t| t.0).collect();
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, title_style())
            .margin(20)
            .x_label_area_size(56)
            .y_label_area_size(80)
            .build_cartesian_2d(Ticked::new(x_lo, x_hi, keys), y_lo..y_hi)?;
        let percent = self.y_percent;
        chart
            .configure_mesh()
            .x_desc(self.axis.desc())
            .y_desc(&self.y_desc)
            .y_labels(8)
            .x_label_formatter(&|x| self.axis.label(*x))
            .y_label_formatter(&|y| {
                if percent {
                    format!("{:.1}%", y * 100.0)
                } else {
                    format!("{y:.2}")
                }
            })
            .label_style(font(15))
            .axis_desc_style(font(17))
            .axis_style(INK.mix(0.6))
            .bold_line_style(INK.mix(0.12))
            .light_line_style(TRANSPARENT)
            .draw()?;
        if let Some(b) = self.axis.break_at {
            chart.draw_series(DashedLineSeries::new(
                [(b, y_lo), (b, y_hi)],
                6,
                4,
                INK.mix(0.35).stroke_width(1),
            ))?;
        }
        let n = self.series.len();
        for (i, (label, stats)) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            // Side by side around the λ position so bars of different series do not overlap.
            let shift = (i as f64 - (n as f64 - 1.0) / 2.0) * 0.08;
            let pts: Vec<(f64, f64, f64)> = stats
                .iter()
                .map(|&(l, m, s)| (self.axis.pos(l) + shift, m, s))
                .collect();
            // Lines only within one side of the break: joining λ = 0 to λ > 0 across it would
            // suggest a slope the axis does not have.
            let right: Vec<(f64, f64)> = pts
                .iter()
                .filter(|p| self.axis.break_at.is_none_or(|b| p.0 > b))
                .map(|p| (p.0, p.1))
                .collect();
            chart.draw_series(LineSeries::new(right, color.mix(0.6).stroke_width(2)))?;
            chart
                .draw_series(pts.iter().map(|&(x, m, s)| {
                    ErrorBar::new_vertical(x, m - s, m, m + s, color.stroke_width(2), 12)
                }))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
            chart.draw_series(
                pts.iter()
                    .map(|&(x, m, _)| Circle::new((x, m), 5, color.filled())),
            )?;
        }
        if !self.points.is_empty() {
            let color = INK.mix(0.55);
            chart
                .draw_series(
                    self.points
                        .iter()
                        .map(|&(l, v)| Circle::new((self.axis.pos(l) + 0.12, v), 3, color)),
                )?
                .label("one seed")
                .legend(move |(x, y)| Circle::new((x + 12, y), 3, color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(font(15))
            .background_style(WHITE.mix(0.9))
            .border_style(INK.mix(0.3))
            .margin(12)
            .draw()?;
        Ok(())
    }
}

/// A colour of the "Blues" ramp for `t` in [0, 1] (white to dark blue).
fn blues(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 5] = [
        (0xf7, 0xfb, 0xff),
        (0xc6, 0xdb, 0xef),
        (0x6b, 0xae, 0xd6),
        (0x21, 0x71, 0xb5),
        (0x08, 0x30, 0x6b),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Where the parts of a heat map go, in pixels, for a given list of classes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HeatmapLayout {
    /// Side of one cell.
    cell: i32,
    /// Left edge of the grid (class names and the axis title to its left).
    left: i32,
    /// Top edge of the grid.
    top: i32,
    /// Font size of the class names.
    label_size: u32,
    /// Column names drawn vertically (else horizontally, staggered on two lines).
    vertical_columns: bool,
    /// Counts written in the cells.
    counts: bool,
    /// The whole figure.
    width: i32,
    height: i32,
}

impl HeatmapLayout {
    fn new(classes: &[String]) -> Self {
        let n = classes.len().max(1) as i32;
        let counts = classes.len() <= MANY_CLASSES;
        // Up to MANY_CLASSES the grid is 640 px wide (64 px cells for CIFAR-10); beyond,
        // cells of 14 px keep an 11 px name legible beside every row.
        let (cell, label_size) = if counts { (640 / n, 15) } else { (14, 11) };
        let widest = classes
            .iter()
            .map(|c| text_width(c, label_size))
            .max()
            .unwrap_or(0);
        // Room for the row names, a gap of 10 and the rotated axis title.
        let left = (widest + 40).max(150);
        let vertical_columns = widest > 2 * cell - 8;
        let bottom = if vertical_columns { widest + 44 } else { 116 };
        let top = 64;
        let grid = cell * n;
        HeatmapLayout {
            cell,
            left,
            top,
            label_size,
            vertical_columns,
            counts,
            width: left + grid + 110,
            height: top + grid + bottom,
        }
    }
}

/// The confusion-matrix heat map, drawn directly in pixels.
struct Heatmap {
    title: String,
    confusion: Vec<Vec<u64>>,
    classes: Vec<String>,
    layout: HeatmapLayout,
}

impl Draw for Heatmap {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError>
    where
        DB::ErrorType: 'static,
    {
        let (w, _) = root.dim_in_pixel();
        let w = w as i32;
        let n = self.classes.len() as i32;
        let l = self.layout;
        let centre = Pos::new(HPos::Center, VPos::Center);
        root.draw(&Text::new(
            self.title.as_str(),
            (w / 2, 28),
            title_style().pos(centre),
        ))?;
        let (left, top, cell) = (l.left, l.top, l.cell);
        let (gw, gh) = (cell * n, cell * n);
        let count_size = if cell >= 50 { 16 } else { 12 };
        // The colour of an empty cell under the whole grid, then only the cells with images:
        // most cells of a 100-class matrix are empty, and the SVG stays small.
        root.draw(&Rectangle::new(
            [(left, top), (left + gw, top + gh)],
            blues(0.0).filled(),
        ))?;
        for (i, row) in self.confusion.iter().enumerate() {
            let total: u64 = row.iter().sum();
            for (j, &c) in row.iter().enumerate() {
                let share = if total > 0 {
                    c as f64 / total as f64
                } else {
                    0.0
                };
                let x0 = left + j as i32 * cell;
                let y0 = top + i as i32 * cell;
                if c > 0 {
                    root.draw(&Rectangle::new(
                        [(x0, y0), (x0 + cell, y0 + cell)],
                        blues(share).filled(),
                    ))?;
                }
                if l.counts {
                    let text_color = if share > 0.5 { WHITE } else { INK };
                    root.draw(&Text::new(
                        c.to_string(),
                        (x0 + cell / 2, y0 + cell / 2),
                        (FAMILY, count_size)
                            .into_font()
                            .color(&text_color)
                            .pos(centre),
                    ))?;
                }
            }
        }
        // Outline of the diagonal (the correct predictions) and of the whole grid.
        let diagonal = if l.counts { 2 } else { 1 };
        for i in 0..n {
            let p = left + i * cell;
            let q = top + i * cell;
            root.draw(&Rectangle::new(
                [(p, q), (p + cell, q + cell)],
                INK.mix(0.7).stroke_width(diagonal),
            ))?;
        }
        root.draw(&Rectangle::new(
            [(left, top), (left + gw, top + gh)],
            INK.mix(0.5),
        ))?;
        let label = font(l.label_size);
        for (i, name) in self.classes.iter().enumerate() {
            let i = i as i32;
            root.draw(&Text::new(
                name.as_str(),
                (left - 10, top + i * cell + cell / 2),
                label.pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            let x = left + i * cell + cell / 2;
            if l.vertical_columns {
                // Read downwards from just below the grid, one name per column.
                root.draw(&Text::new(
                    name.as_str(),
                    (x, top + gh + 8),
                    label
                        .transform(FontTransform::Rotate90)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                ))?;
            } else {
                // Staggered on two lines so long names ("automobile") never collide.
                let y = top + gh + 16 + (i % 2) * 20;
                root.draw(&Text::new(name.as_str(), (x, y), label.pos(centre)))?;
            }
        }
        let axis_y = if l.vertical_columns {
            l.height - 22
        } else {
            top + gh + 72
        };
        root.draw(&Text::new(
            "predicted class",
            (left + gw / 2, axis_y),
            font(17).pos(centre),
        ))?;
        root.draw(&Text::new(
            "true class",
            (22, top + gh / 2),
            font(17).transform(FontTransform::Rotate270).pos(centre),
        ))?;
        // Colour bar: share of the row.
        let (bx, bw) = (left + gw + 30, 18);
        let steps = 60;
        for s in 0..steps {
            // One pixel of overlap so no seam shows between the steps.
            let t0 = (top + gh - (s + 1) * gh / steps - 1).max(top);
            let t1 = top + gh - s * gh / steps;
            root.draw(&Rectangle::new(
                [(bx, t0), (bx + bw, t1)],
                blues((s as f64 + 0.5) / steps as f64).filled(),
            ))?;
        }
        root.draw(&Rectangle::new(
            [(bx, top), (bx + bw, top + gh)],
            INK.mix(0.5),
        ))?;
        for k in 0..=4 {
            let y = top + gh - k * gh / 4;
            root.draw(&Text::new(
                format!("{}%", k * 25),
                (bx + bw + 6, y),
                font(13).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        root.draw(&Text::new(
            "share of the true class",
            (bx + bw + 50, top + gh / 2),
            font(14).transform(FontTransform::Rotate90).pos(centre),
        ))?;
        Ok(())
    }
}

/// Horizontal bars, one per class, top to bottom in the order given.
struct Bars {
    title: String,
    classes: Vec<String>,
    /// Accuracy per class; `None` for a class without test images.
    values: Vec<Option<f64>>,
    overall: Option<f64>,
    /// Font size of the class names and of the values on the bars.
    label_size: u32,
    value_size: u32,
    /// Width of the class names' area.
    label_area: u32,
}

impl Draw for Bars {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError>
    where
        DB::ErrorType: 'static,
    {
        let n = self.classes.len();
        let nf = n as f64;
        // Class 0 at the top: row i spans [n-1-i, n-i) on the y axis; the strip above n holds
        // the label of the overall-accuracy line.
        let centres: Vec<f64> = (0..n).map(|i| nf - i as f64 - 0.5).collect();
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, title_style())
            .margin(20)
            .margin_right(40)
            .x_label_area_size(56)
            .y_label_area_size(self.label_area)
            .build_cartesian_2d(0f64..1f64, Ticked::new(0.0, nf + 0.7, centres))?;
        let classes = &self.classes;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("accuracy (recall): correct / images of the class")
            .x_labels(11)
            .y_labels(n)
            .x_label_formatter(&|x| format!("{:.0}%", x * 100.0))
            .y_label_formatter(&|y| {
                let i = (nf - y).floor();
                if i >= 0.0 && (i as usize) < n {
                    classes[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_label_style(font(self.label_size))
            .x_label_style(font(15))
            .axis_desc_style(font(17))
            .axis_style(INK.mix(0.6))
            .bold_line_style(INK.mix(0.12))
            .light_line_style(TRANSPARENT)
            .draw()?;
        let color = PALETTE[0];
        for (i, v) in self.values.iter().enumerate() {
            let y1 = nf - i as f64 - 0.15;
            let y0 = nf - i as f64 - 0.85;
            let mid = (y0 + y1) / 2.0;
            match v {
                Some(v) => {
                    chart.draw_series([Rectangle::new([(0.0, y0), (*v, y1)], color.filled())])?;
                    // At the start of the bar (away from the overall line) when there is
                    // room, else just right of it.
                    let (x, ink) = if *v > 0.1 {
                        (0.012, WHITE)
                    } else {
                        (*v + 0.01, INK)
                    };
                    chart.draw_series([Text::new(
                        format!("{:.1}%", v * 100.0),
                        (x, mid),
                        (FAMILY, self.value_size)
                            .into_font()
                            .color(&ink)
                            .pos(Pos::new(HPos::Left, VPos::Center)),
                    )])?;
                }
                None => {
                    chart.draw_series([Text::new(
                        "no test images",
                        (0.01, mid),
                        font(self.value_size).pos(Pos::new(HPos::Left, VPos::Center)),
                    )])?;
                }
            }
        }
        if let Some(a) = self.overall {
            chart.draw_series(DashedLineSeries::new(
                [(a, 0.0), (a, nf + 0.1)],
                8,
                5,
                INK.stroke_width(2),
            ))?;
            chart.draw_series([Text::new(
                format!("overall {:.1}%", a * 100.0),
                // Kept inside the plot when the line is near an edge.
                (a.clamp(0.07, 0.93), nf + 0.35),
                font(15).pos(Pos::new(HPos::Center, VPos::Center)),
            )])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_axis_sets_zero_one_decade_left() {
        let axis = LambdaAxis::new(&[0.0, 1e-4, 1e-3, 1e-1, 1e-3]).unwrap();
        let pos: Vec<f64> = axis.ticks.iter().map(|t| t.0).collect();
        assert_eq!(pos.len(), 4);
        // f32 λ: log10(1e-4f32) is -4 to ~1e-8.
        assert!((pos[0] + 5.0).abs() < 1e-6, "{pos:?}");
        assert!((pos[1] + 4.0).abs() < 1e-6);
        assert!((axis.break_at.unwrap() + 4.5).abs() < 1e-6);
        assert_eq!(axis.label(-5.0), "0");
        assert_eq!(axis.label(-2.9), "0.001");
        assert_eq!(axis.label(-4.1), "1e-4");
        let (lo, hi) = axis.range();
        assert!(lo < -5.0 && hi > -1.0);
    }

    #[test]
    fn lambda_axis_without_zero_has_no_break() {
        let axis = LambdaAxis::new(&[0.01, 0.1]).unwrap();
        assert_eq!(axis.break_at, None);
        assert_eq!(axis.zero, None);
        let only_zero = LambdaAxis::new(&[0.0]).unwrap();
        assert_eq!(only_zero.ticks, vec![(0.0, 0.0)]);
        assert!(LambdaAxis::new(&[-1.0]).is_err());
        assert!(LambdaAxis::new(&[f32::NAN]).is_err());
    }

    #[test]
    fn blues_runs_from_white_to_dark() {
        assert_eq!(blues(0.0), RGBColor(0xf7, 0xfb, 0xff));
        assert_eq!(blues(1.0), RGBColor(0x08, 0x30, 0x6b));
        assert_eq!(blues(2.0), blues(1.0));
    }

    #[test]
    fn confusion_shape_is_checked() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let err = confusion_heatmap(&[vec![1, 2]], &classes).unwrap_err();
        assert!(err.to_string().contains("confusion matrix"), "{err}");
    }
}
