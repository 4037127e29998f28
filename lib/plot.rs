//! The training-loss plot: train and val loss against step, as a PNG written beside the
//! checkpoints. Drawn with plotters into an RGB buffer and encoded with `png`; the labels use a
//! font embedded in the binary (data/fonts), so no system font is needed.

use crate::fsutil::{AtomicFile, FsError};
use plotters::coord::ranged1d::Ranged;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};

/// One curve: `points` are (step, loss). Non-finite values, and values beyond +-1e300 (whose
/// spans would overflow), are skipped.
pub struct Series {
    pub label: String,
    pub color: [u8; 3],
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: cannot draw a {width}x{height} plot (width 160..=8192, height 120..=8192)")]
    Size { path: PathBuf, width: u32, height: u32 },
    #[error("drawing loss plot {path}: {msg}")]
    Draw { path: PathBuf, msg: String },
    #[error("writing loss plot {path}: {source}")]
    Write { path: PathBuf, source: FsError },
    #[error("encoding loss plot {path}: {source}")]
    Encode { path: PathBuf, source: png::EncodingError },
}

/// The y range is widened by this fraction of its span on each side so curves clear the frame.
const Y_PAD: f64 = 0.04;
const AXIS: [u8; 3] = [0, 0, 0];
/// Not pure black, so the frame is the only black in the picture (the tests find it by colour).
const TEXT: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [228, 228, 228];
const LEGEND_BORDER: [u8; 3] = [200, 200, 200];
/// Ticks per axis that plotters may place at most.
const TICKS: usize = 6;

/// DejaVu Sans cut down to Latin-1 (data/fonts/LICENSE says how); plotters' `ab_glyph` feature
/// draws text only with fonts registered under a family name.
const FONT: &[u8] = include_bytes!("../data/fonts/DejaVuSans-Latin1.ttf");
const FAMILY: &str = "zerokit-sans";

/// Registers [`FONT`] once per process; false if it did not parse (never for the file shipped).
fn font_registered() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok())
}

/// Writes a `width` x `height` RGB PNG of `series` (loss against step) atomically at `path`.
pub fn write_loss_plot(path: &Path, title: &str, series: &[Series], width: u32, height: u32) -> Result<(), PlotError> {
    if !(160..=8192).contains(&width) || !(120..=8192).contains(&height) {
        return Err(PlotError::Size { path: path.into(), width, height });
    }
    let draw_err = |msg: String| PlotError::Draw { path: path.into(), msg };
    let rgb = render(title, series, width, height).map_err(draw_err)?;
    let write_err = |source| PlotError::Write { path: path.into(), source };
    let mut file = AtomicFile::create(path).map_err(write_err)?;
    let encode_err = |source| PlotError::Encode { path: path.into(), source };
    let mut enc = png::Encoder::new(&mut file, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(encode_err)?;
    w.write_image_data(&rgb).map_err(encode_err)?;
    w.finish().map_err(encode_err)?;
    // A failed commit removes its temporary: the plot is rewritten at every evaluation, so none
    // may pile up.
    file.commit().map(|_| ()).map_err(write_err)
}

fn finite(v: f64) -> bool {
    v.is_finite() && v.abs() <= 1e300
}

/// The drawn range for data in [lo, hi]: no data gives [0, 1], and equal ends (a span below
/// 1e-9 of the values, or below 1e-100) are widened around their middle, by a tenth of it (or
/// by 1 near zero), so every range has room for ticks.
// The negated comparisons are true for NaN too, which must take the fallback.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn range(mut lo: f64, mut hi: f64) -> (f64, f64) {
    if !(lo <= hi) {
        (lo, hi) = (0.0, 1.0);
    }
    if !(hi - lo > 1e-9 * lo.abs().max(hi.abs()).max(1e-100)) {
        let mid = 0.5 * (lo + hi);
        let pad = if mid.abs() > 1e-6 { 0.1 * mid.abs() } else { 1.0 };
        (lo, hi) = (mid - pad, mid + pad);
    }
    (lo, hi)
}

/// A tick label for `v` on an axis spanning `span`: two digits below the span's leading one,
/// trailing zeros trimmed, so float noise (0.30000000000000004) never shows; scientific
/// notation (1.5e7, 2e-6) for spans from 1e6 up or below 1e-4.
fn label(v: f64, span: f64) -> String {
    if v.abs() <= 1e-9 * span {
        return "0".into();
    }
    let e = span.log10().floor() as i32;
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if (-4..6).contains(&e) {
        return trim(format!("{v:.*}", (2 - e).max(0) as usize));
    }
    let digits = (v.abs().log10().floor() as i32 - e + 2).max(0) as usize;
    let s = format!("{v:.digits$e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    format!("{}e{exp}", trim(mantissa.to_string()))
}

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// The picture as RGB rows, top first.
fn render(title: &str, series: &[Series], w: u32, h: u32) -> Result<Vec<u8>, String> {
    if !font_registered() {
        return Err("the embedded font does not parse".into());
    }
    let finite_points = |s: &Series| s.points.iter().copied().filter(|(x, y)| finite(*x) && finite(*y)).collect();
    let curves: Vec<Vec<(f64, f64)>> = series.iter().map(finite_points).collect();
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in curves.iter().flatten() {
        (xlo, xhi, ylo, yhi) = (xlo.min(x), xhi.max(x), ylo.min(y), yhi.max(y));
    }
    let (xlo, xhi) = range(xlo, xhi);
    let (ylo, yhi) = range(ylo - Y_PAD * (yhi - ylo), yhi + Y_PAD * (yhi - ylo));

    // Text 16 px high on an 800x500 plot, scaled with the image and never below 10 px.
    let size = (w.min(h) as f64 / 500.0 * 16.0).max(10.0);
    let pad = (size / 2.0) as u32;
    let font = (FAMILY, size).into_font().color(&rgb(TEXT));
    let err = |e: &dyn std::fmt::Display| e.to_string();

    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        // The y labels' area is as wide as the widest label plotters will put there.
        let ylabels = RangedCoordf64::from(ylo..yhi).key_points(TICKS);
        let text_w = |s: &str| root.estimate_text_size(s, &font).map(|(tw, _)| tw).map_err(|e| err(&e));
        let mut ylab_w = 0;
        for v in ylabels {
            ylab_w = ylab_w.max(text_w(&label(v, yhi - ylo))?);
        }
        // The last x label is centred on the right end of the axis: half of it needs room there.
        let last_x = RangedCoordf64::from(xlo..xhi).key_points(TICKS).last().map(|&v| label(v, xhi - xlo));
        let right = pad + last_x.map_or(Ok(0), |s| text_w(&s))? / 2;
        let (xspan, yspan) = (xhi - xlo, yhi - ylo);
        let xfmt = move |v: &f64| label(*v, xspan);
        let yfmt = move |v: &f64| label(*v, yspan);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, font.clone())
            .margin(pad)
            .margin_right(right)
            // Ticks, their labels and the axis name below the x axis, with a pad between each.
            .x_label_area_size((3.0 * size) as u32 + 2 * pad)
            .y_label_area_size(ylab_w + size as u32 + 3 * pad)
            .build_cartesian_2d(xlo..xhi, ylo..yhi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_labels(TICKS)
            .y_labels(TICKS)
            .x_label_formatter(&xfmt)
            .y_label_formatter(&yfmt)
            .bold_line_style(rgb(GRID))
            .light_line_style(TRANSPARENT)
            .axis_style(rgb(AXIS))
            .label_style(font.clone())
            .axis_desc_style(font.clone())
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(&e))?;

        for (s, points) in series.iter().zip(&curves) {
            let style = rgb(s.color).stroke_width(2);
            let legend = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + (1.5 * size) as i32, y)], style);
            chart
                .draw_series(std::iter::once(PathElement::new(points.clone(), style)))
                .map_err(|e| err(&e))?
                .label(s.label.as_str())
                .legend(legend);
            // A curve whose points all land on one pixel (a lone point, or a span too small to
            // show) would draw nothing; a marker makes it visible.
            let pixel = |p: &(f64, f64)| chart.backend_coord(p);
            if let Some(first) = points.first().filter(|p| points.iter().all(|q| pixel(q) == pixel(p))) {
                chart
                    .draw_series(std::iter::once(Circle::new(*first, 3, rgb(s.color).filled())))
                    .map_err(|e| err(&e))?;
            }
        }

        // The frame again, on top of the curves, so it stays unbroken where a curve meets it
        // (plotters draws the axes just outside the plotting area, before the series).
        let (xs, ys) = chart.plotting_area().get_pixel_range();
        let frame = vec![(xs.start - 1, ys.start), (xs.start - 1, ys.end), (xs.end - 1, ys.end)];
        root.draw(&PathElement::new(frame, rgb(AXIS))).map_err(|e| err(&e))?;

        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .margin(pad)
                .label_font(font.clone())
                .background_style(WHITE)
                .border_style(rgb(LEGEND_BORDER))
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLUE: [u8; 3] = [31, 119, 180];
    const ORANGE: [u8; 3] = [255, 127, 14];

    fn series(label: &str, color: [u8; 3], points: Vec<(f64, f64)>) -> Series {
        Series { label: label.into(), color, points }
    }

    fn decode(p: &Path) -> (u32, u32, Vec<u8>) {
        let file = std::io::BufReader::new(std::fs::File::open(p).unwrap());
        let mut r = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn px(img: &[u8], w: u32, x: i64, y: i64) -> [u8; 3] {
        let i = 3 * (y as usize * w as usize + x as usize);
        [img[i], img[i + 1], img[i + 2]]
    }

    fn ticks(lo: f64, hi: f64) -> Vec<f64> {
        RangedCoordf64::from(lo..hi).key_points(TICKS)
    }

    #[test]
    fn ticks_cover_the_data_with_distinct_labels() {
        // Ranges of every scale (xorshift-random), with equal ends among the hand-picked ones.
        let mut cases = vec![(5.1, 14.9), (0.5, 7.5), (2.0, 11.0), (1e6, 1e6 + 3.0), (-3.0, -2.99), (3.0, 3.0)];
        let mut s = 0x2545F4914F6CDD1Du64;
        for _ in 0..20000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let (a, b) = ((s % 1000) as f64 - 500.0, ((s >> 20) % 100000) as f64 / 1000.0);
            let scale = 10f64.powi((s >> 40) as i32 % 16 - 8);
            cases.push((a * scale, (a + b) * scale));
        }
        for (lo, hi) in cases {
            let (rlo, rhi) = range(lo, hi);
            // Equal ends are padded to a span of at most 0.2 * |value| (or 2 near zero).
            let span = if hi - lo > 1e-9 * hi.abs().max(lo.abs()) { hi - lo } else { 0.2 * hi.abs().max(10.0) };
            assert!(rlo <= lo && rhi >= hi && rhi - rlo <= span, "{lo}..{hi}: {rlo}..{rhi}");
            let t = ticks(rlo, rhi);
            assert!((2..=TICKS).contains(&t.len()), "{lo}..{hi}: {t:?}");
            assert!(t.iter().all(|&v| v >= rlo && v <= rhi), "{lo}..{hi}: a tick outside {rlo}..{rhi}: {t:?}");
            let labels: Vec<String> = t.iter().map(|&v| label(v, rhi - rlo)).collect();
            let mut distinct = labels.clone();
            distinct.dedup();
            assert_eq!(distinct, labels, "{lo}..{hi}: ticks {t:?}");
        }
    }

    #[test]
    fn labels_are_exact() {
        let labels = |lo: f64, hi: f64| ticks(lo, hi).into_iter().map(|v| label(v, hi - lo)).collect::<Vec<_>>();
        assert_eq!(labels(0.0, 100000.0), ["0", "20000", "40000", "60000", "80000", "100000"]);
        assert_eq!(labels(0.0, 0.3), ["0", "0.1", "0.2", "0.3"]);
        assert_eq!(labels(0.0, 3e-6), ["0", "1e-6", "2e-6", "3e-6"]);
        assert_eq!(labels(0.0, 2.5e7), ["0", "5e6", "1e7", "1.5e7", "2e7", "2.5e7"]);
        // plotters steps by 0.05 here; float noise (-0.15000000000000002) does not show.
        assert_eq!(labels(-0.3, 0.0), ["-0.25", "-0.2", "-0.15", "-0.1", "-0.05", "0"]);
        assert_eq!(labels(-0.4, 10.4), ["0", "2", "4", "6", "8", "10"]);
        assert_eq!(label(0.1 + 0.2, 1.0), "0.3");
        assert_eq!(label(0.25, 1.0), "0.25");
    }

    /// Finds the axes in the image itself (the longest black column and row, followed while
    /// contiguous), so the mapping check does not trust the layout code it is checking.
    fn frame(img: &[u8], w: u32, h: u32) -> (i64, i64, i64, i64) {
        let black = |x: i64, y: i64| px(img, w, x, y) == AXIS;
        let x0 = (0..w as i64).max_by_key(|&x| (0..h as i64).filter(|&y| black(x, y)).count()).unwrap();
        let y1 = (0..h as i64).max_by_key(|&y| (0..w as i64).filter(|&x| black(x, y)).count()).unwrap();
        let y0 = (0..=y1).rev().take_while(|&y| black(x0, y)).last().unwrap();
        let x1 = (x0..w as i64).take_while(|&x| black(x, y1)).last().unwrap();
        (x0, y0, x1, y1)
    }

    fn near(img: &[u8], w: u32, x: f64, y: f64, c: [u8; 3]) -> bool {
        let (x, y) = (x.round() as i64, y.round() as i64);
        (x - 1..=x + 1).any(|x| (y - 1..=y + 1).any(|y| px(img, w, x, y) == c))
    }

    #[test]
    fn curves_land_where_the_axes_say() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train = series("train", BLUE, vec![(0.0, 10.0), (50.0, 0.0), (100.0, 10.0)]);
        let val = series("val", ORANGE, vec![(0.0, 5.0), (100.0, 5.0)]);
        write_loss_plot(&path, "GPT-2 (124M)", &[train, val], 800, 500).unwrap();
        let (w, h, img) = decode(&path);
        assert_eq!((w, h), (800, 500));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left");
        let (x0, y0, x1, y1) = frame(&img, w, h);
        assert!(x1 - x0 > 500 && y1 - y0 > 300, "plot area {x0},{y0}..{x1},{y1} is too small");
        // x spans the data [0, 100] exactly (ticks 0..100 by 20); y is [0, 10] padded by Y_PAD
        // of its span on each side (ticks 0..10 by 2).
        let map = |x: f64, y: f64| {
            let (ylo, yhi) = (-10.0 * Y_PAD, 10.0 + 10.0 * Y_PAD);
            (x0 as f64 + x / 100.0 * (x1 - x0) as f64, y1 as f64 - (y - ylo) / (yhi - ylo) * (y1 - y0) as f64)
        };
        // (Where the V crosses the val line at y = 5, the val line, drawn later, covers it.)
        for (x, y, c) in [(50.0, 0.0, BLUE), (20.0, 6.0, BLUE), (80.0, 6.0, BLUE), (10.0, 5.0, ORANGE)] {
            let (mx, my) = map(x, y);
            assert!(near(&img, w, mx, my, c), "no {c:?} pixel near ({mx}, {my}) for ({x}, {y})");
        }
        // And not elsewhere: the bottom of the V is far from the top of the plot.
        let (mx, my) = map(50.0, 9.0);
        assert!(!near(&img, w, mx, my, BLUE));
        // Lines are drawn with stroke width 2, which plotters fills as 3 pixel rows: a vertical
        // cut through the flat val line (left of the legend) meets 3 orange pixels, unblended.
        let (mx, _) = map(60.0, 5.0);
        assert_eq!((y0..=y1).filter(|&y| px(&img, w, mx as i64, y) == ORANGE).count(), 3);
    }

    #[test]
    fn degenerate_inputs_still_draw() {
        let dir = tempfile::tempdir().unwrap();
        let one = |points: &[(f64, f64)]| vec![series("train", BLUE, points.to_vec())];
        let (nan, inf) = (f64::NAN, f64::INFINITY);
        let cases = [
            vec![],
            one(&[]),
            one(&[(7.0, 3.0)]),
            one(&[(0.0, 2.0), (5.0, 2.0), (10.0, 2.0)]),
            one(&[(nan, 1.0), (0.0, inf), (1.0, nan)]),
            one(&[(0.0, 4.0), (1.0, nan), (2.0, -inf), (3.0, 2.0)]),
            one(&[(-f64::MAX, 1.0), (0.0, 1e300), (1.0, -1e300), (2.0, 1e-310), (3.0, 0.0)]),
            // Spans below 1e-100 count as equal ends: both points land on one padded pixel.
            one(&[(1e-310, 2e-310), (3e-310, 1e-310)]),
        ];
        let mut blue = vec![];
        for (i, s) in cases.iter().enumerate() {
            let path = dir.path().join(format!("{i}.png"));
            write_loss_plot(&path, "", s, 200, 150).unwrap();
            let (w, h, img) = decode(&path);
            assert_eq!((w, h), (200, 150));
            blue.push(img.chunks(3).filter(|p| *p == BLUE).count());
        }
        // Case 1 (no points) shows only the legend's swatch; each drawable case adds a curve
        // or a marker to it, the all-NaN case adds nothing.
        let legend = blue[1];
        assert!(legend > 0 && blue[0] == 0 && blue[4] == legend, "{blue:?}");
        assert!([2, 3, 5, 6].iter().all(|&i| blue[i] > legend + 20) && blue[7] > legend, "{blue:?}");
    }

    #[test]
    fn failed_writes_leave_nothing_and_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = [series("train", BLUE, vec![(0.0, 1.0), (1.0, 0.5)])];
        let missing = dir.path().join("no-such-dir").join("loss.png");
        let err = write_loss_plot(&missing, "t", &s, 800, 500).unwrap_err();
        let named = |err: &PlotError, p: &Path| err.to_string().contains(&p.display().to_string());
        assert!(matches!(err, PlotError::Write { .. }) && named(&err, &missing), "{err}");
        assert!(!missing.exists());
        // A directory in the way: the rename fails, the directory stays, no temporary remains.
        let blocked = dir.path().join("loss.png");
        std::fs::create_dir(&blocked).unwrap();
        let err = write_loss_plot(&blocked, "t", &s, 800, 500).unwrap_err();
        assert!(named(&err, &blocked), "{err}");
        assert!(blocked.is_dir() && std::fs::read_dir(dir.path()).unwrap().count() == 1);
        let err = write_loss_plot(&dir.path().join("tiny.png"), "t", &s, 10, 10).unwrap_err();
        assert!(matches!(err, PlotError::Size { .. }) && err.to_string().contains("tiny.png"), "{err}");
    }

    /// A realistic run; ZEROKIT_PLOT_PREVIEW=/tmp/plot.png keeps a copy to look at.
    #[test]
    fn realistic_run_renders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let noise = |i: u64| ((i.wrapping_mul(2654435761) % 1000) as f64 / 1000.0 - 0.5) * 0.15;
        let curve = |i: u64| 3.0 + 8.0 * (-(i as f64) / 400.0).exp();
        let train = (0..5000).map(|i| (i as f64, curve(i) + noise(i))).collect();
        let val = (0..=5000).step_by(250).map(|i| (i as f64, curve(i) + 0.1)).collect();
        let s = [series("train loss", BLUE, train), series("val loss", ORANGE, val)];
        write_loss_plot(&path, "gpt2-124m zero-2 step 5000", &s, 800, 500).unwrap();
        let (w, h, img) = decode(&path);
        assert_eq!((w, h), (800, 500));
        assert!(img.chunks(3).any(|p| p == BLUE) && img.chunks(3).any(|p| p == ORANGE));
        if let Some(out) = std::env::var_os("ZEROKIT_PLOT_PREVIEW") {
            std::fs::copy(&path, out).unwrap();
        }
    }
}
