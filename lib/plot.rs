//! The training-loss plot: train and val loss against step, as a PNG written beside the
//! checkpoints. Drawn by hand (lines, axes, a 5x7 bitmap font) so the binary needs no plotting
//! framework and no system fonts.

use crate::fsutil::{temp_sibling, AtomicFile, FsError};
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
    #[error("writing loss plot {path}: {source}")]
    Write { path: PathBuf, source: FsError },
    #[error("encoding loss plot {path}: {source}")]
    Encode { path: PathBuf, source: png::EncodingError },
}

/// The y range is widened by this fraction of its span on each side so curves clear the frame.
const Y_PAD: f64 = 0.04;
const AXIS: [u8; 3] = [0, 0, 0];
const TEXT: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [228, 228, 228];

/// One byte per glyph row, top row first (the 8th holds descenders); bit 4 of a row is the
/// leftmost of its 5 columns.
#[rustfmt::skip]
const LOWER: [u64; 26] = [
    0x00_00_0E_01_0F_11_0F_00, 0x10_10_16_19_11_11_1E_00, 0x00_00_0E_10_10_11_0E_00, // a b c
    0x01_01_0D_13_11_11_0F_00, 0x00_00_0E_11_1F_10_0E_00, 0x06_09_08_1C_08_08_08_00, // d e f
    0x00_00_0F_11_11_0F_01_0E, 0x10_10_16_19_11_11_11_00, 0x04_00_0C_04_04_04_0E_00, // g h i
    0x02_00_06_02_02_02_12_0C, 0x10_10_12_14_18_14_12_00, 0x0C_04_04_04_04_04_0E_00, // j k l
    0x00_00_1A_15_15_11_11_00, 0x00_00_16_19_11_11_11_00, 0x00_00_0E_11_11_11_0E_00, // m n o
    0x00_00_1E_11_11_1E_10_10, 0x00_00_0F_11_11_0F_01_01, 0x00_00_16_19_10_10_10_00, // p q r
    0x00_00_0E_10_0E_01_1E_00, 0x08_08_1C_08_08_09_06_00, 0x00_00_11_11_11_13_0D_00, // s t u
    0x00_00_11_11_11_0A_04_00, 0x00_00_11_11_15_15_0A_00, 0x00_00_11_0A_04_0A_11_00, // v w x
    0x00_00_11_11_11_0F_01_0E, 0x00_00_1F_02_04_08_1F_00, // y z
];
#[rustfmt::skip]
const DIGITS: [u64; 10] = [
    0x0E_11_13_15_19_11_0E_00, 0x04_0C_04_04_04_04_0E_00, 0x0E_11_01_02_04_08_1F_00, // 0 1 2
    0x1F_02_04_02_01_11_0E_00, 0x02_06_0A_12_1F_02_02_00, 0x1F_10_1E_01_01_11_0E_00, // 3 4 5
    0x06_08_10_1E_11_11_0E_00, 0x1F_01_02_04_08_08_08_00, 0x0E_11_11_0E_11_11_0E_00, // 6 7 8
    0x0E_11_11_0F_01_02_0C_00, // 9
];

/// Upper case is drawn as lower case (one alphabet keeps the table small); anything the table
/// lacks is drawn as '?' so a title never fails to render.
fn glyph(c: char) -> u64 {
    match c.to_ascii_lowercase() {
        c @ 'a'..='z' => LOWER[c as usize - 'a' as usize],
        c @ '0'..='9' => DIGITS[c as usize - '0' as usize],
        ' ' => 0,
        '.' => 0x00_00_00_00_00_0C_0C_00,
        ',' => 0x00_00_00_00_00_0C_04_08,
        '-' => 0x00_00_00_0E_00_00_00_00,
        '+' => 0x00_04_04_1F_04_04_00_00,
        '=' => 0x00_00_1F_00_1F_00_00_00,
        '_' => 0x00_00_00_00_00_00_00_1F,
        ':' => 0x00_0C_0C_00_0C_0C_00_00,
        '/' => 0x00_01_02_04_08_10_00_00,
        '(' => 0x02_04_08_08_08_04_02_00,
        ')' => 0x08_04_02_02_02_04_08_00,
        _ => 0x0E_11_01_02_04_00_04_00,
    }
}

/// An axis range with ticks at k * m * 10^e for k in k0..=k1 (m is 1, 2 or 5).
#[derive(Debug)]
struct Axis {
    lo: f64,
    hi: f64,
    m: i64,
    e: i32,
    k0: i64,
    k1: i64,
}

impl Axis {
    /// Picks the smallest 1/2/5 x 10^k step with at most 6 ticks inside [lo, hi], then widens
    /// the range to the next tick on either side while there are fewer than 4. The step below
    /// had 7 or more, so this one spans at least 2.4 steps and widening always reaches 4.
    // The negated comparisons are true for NaN too, which must take the fallback.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn nice(mut lo: f64, mut hi: f64) -> Axis {
        if !(lo <= hi) {
            (lo, hi) = (0.0, 1.0);
        }
        if !(hi - lo > 1e-9 * lo.abs().max(hi.abs()).max(1e-100)) {
            let mid = 0.5 * (lo + hi);
            let pad = if mid.abs() > 1e-6 { 0.1 * mid.abs() } else { 1.0 };
            (lo, hi) = (mid - pad, mid + pad);
        }
        let eps = 1e-9;
        let mut e = ((hi - lo) / 10.0).log10().floor() as i32;
        let (mut m, mut k0, mut k1) = (1, 0, 0);
        'search: for _ in 0..8 {
            for cand in [1, 2, 5] {
                let step = cand as f64 * 10f64.powi(e);
                (m, k0, k1) = (cand, (lo / step - eps).ceil() as i64, (hi / step + eps).floor() as i64);
                if k1 - k0 < 6 {
                    break 'search;
                }
            }
            e += 1;
        }
        let step = m as f64 * 10f64.powi(e);
        if k1 - k0 < 3 && (k0 as f64) > lo / step + eps {
            k0 -= 1;
            lo = k0 as f64 * step;
        }
        if k1 - k0 < 3 && (k1 as f64) < hi / step - eps {
            k1 += 1;
            hi = k1 as f64 * step;
        }
        Axis { lo, hi, m, e, k0, k1 }
    }

    fn ticks(&self) -> impl Iterator<Item = (f64, String)> + '_ {
        (self.k0..=self.k1).map(|k| (k as f64 * self.m as f64 * 10f64.powi(self.e), self.label(k)))
    }

    /// Built from the integers k * m and e, so float noise (0.30000000000000004) never shows.
    fn label(&self, k: i64) -> String {
        let v = k * self.m;
        match self.e {
            _ if v == 0 => "0".into(),
            0..=5 => (v * 10i64.pow(self.e as u32)).to_string(),
            -4..=-1 => format!("{:.*}", (-self.e) as usize, v as f64 * 10f64.powi(self.e)),
            _ => {
                let digits = v.unsigned_abs().to_string();
                let (head, tail) = digits.split_at(1);
                let tail = tail.trim_end_matches('0');
                let sign = if v < 0 { "-" } else { "" };
                let dot = if tail.is_empty() { "" } else { "." };
                format!("{sign}{head}{dot}{tail}e{}", self.e + digits.len() as i32 - 1)
            }
        }
    }

    /// Maps a value to a pixel coordinate between `a` (at lo) and `b` (at hi).
    fn map(&self, v: f64, a: i64, b: i64) -> i64 {
        let t = (v - self.lo) / (self.hi - self.lo);
        (a as f64 + t * (b - a) as f64).round().clamp(-1e6, 1e6) as i64
    }
}

struct Canvas {
    w: i64,
    h: i64,
    rgb: Vec<u8>,
    clip: (i64, i64, i64, i64),
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        let (cx0, cy0, cx1, cy1) = self.clip;
        if x >= cx0.max(0) && x <= cx1.min(self.w - 1) && y >= cy0.max(0) && y <= cy1.min(self.h - 1) {
            let i = 3 * (y * self.w + x) as usize;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fills the inclusive rectangle.
    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0.max(0)..=y1.min(self.h - 1) {
            for x in x0.max(0)..=x1.min(self.w - 1) {
                self.set(x, y, c);
            }
        }
    }

    /// Bresenham with a 2x2 stamp, which makes every line 2 px wide.
    fn line(&mut self, (mut x, mut y): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
        let (sx, sy) = ((x1 - x).signum(), (y1 - y).signum());
        let mut err = dx + dy;
        loop {
            self.fill(x, y, x + 1, y + 1, c);
            if x == x1 && y == y1 {
                return;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, sc: i64, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            for row in 0..8 {
                let bits = glyph(ch) >> (56 - 8 * row);
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (gx, gy) = (x + (6 * i as i64 + col) * sc, y + row * sc);
                        self.fill(gx, gy, gx + sc - 1, gy + sc - 1, c);
                    }
                }
            }
        }
    }
}

fn text_width(s: &str, sc: i64) -> i64 {
    (6 * s.chars().count() as i64 - 1).max(0) * sc
}

/// Writes a `width` x `height` RGB PNG of `series` (loss against step) atomically at `path`.
pub fn write_loss_plot(path: &Path, title: &str, series: &[Series], width: u32, height: u32) -> Result<(), PlotError> {
    if !(160..=8192).contains(&width) || !(120..=8192).contains(&height) {
        return Err(PlotError::Size { path: path.into(), width, height });
    }
    let rgb = render(title, series, width as i64, height as i64);
    let write_err = |source| PlotError::Write { path: path.into(), source };
    let mut file = AtomicFile::create(path).map_err(write_err)?;
    let encode_err = |source| PlotError::Encode { path: path.into(), source };
    let mut enc = png::Encoder::new(&mut file, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(encode_err)?;
    w.write_image_data(&rgb).map_err(encode_err)?;
    w.finish().map_err(encode_err)?;
    // A failed rename leaves AtomicFile's temporary behind; the plot is rewritten at every
    // evaluation, so it must not pile up.
    file.commit().map(|_| ()).map_err(|e| {
        let _ = std::fs::remove_file(temp_sibling(path));
        write_err(e)
    })
}

fn finite(v: f64) -> bool {
    v.is_finite() && v.abs() <= 1e300
}

fn render(title: &str, series: &[Series], w: i64, h: i64) -> Vec<u8> {
    let pts = || series.iter().flat_map(|s| &s.points).filter(|(x, y)| finite(*x) && finite(*y));
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts() {
        (xlo, xhi, ylo, yhi) = (xlo.min(x), xhi.max(x), ylo.min(y), yhi.max(y));
    }
    let xa = Axis::nice(xlo, xhi);
    let ya = Axis::nice(ylo - Y_PAD * (yhi - ylo), yhi + Y_PAD * (yhi - ylo));
    let (xt, yt): (Vec<_>, Vec<_>) = (xa.ticks().collect(), ya.ticks().collect());

    // 5x7 glyphs scaled to stay legible on large images; `pad` separates every element.
    let sc = (w.min(h) / 250).max(1);
    let (ch, pad, tick) = (7 * sc, 4 * sc, 3 * sc);
    let ylab_w = yt.iter().map(|(_, s)| text_width(s, sc)).max().unwrap_or(0);
    let last_xlab_w = xt.last().map_or(0, |(_, s)| text_width(s, sc));
    let x0 = (2 * pad + tick + ylab_w).min(w / 2);
    let x1 = (w - 1 - (3 * pad).max(last_xlab_w / 2 + pad)).max(x0 + 16);
    let y0 = 3 * pad + 2 * ch;
    let y1 = h - 1 - (tick + 4 * pad + 2 * ch);

    let mut c = Canvas { w, h, rgb: vec![255; (w * h * 3) as usize], clip: (0, 0, w - 1, h - 1) };
    for &(v, _) in &xt {
        let px = xa.map(v, x0, x1);
        c.fill(px, y0, px, y1, GRID);
    }
    for &(v, _) in &yt {
        let py = ya.map(v, y1, y0);
        c.fill(x0, py, x1, py, GRID);
    }

    c.clip = (x0, y0, x1, y1);
    for s in series {
        let mut prev = None;
        for &(x, y) in s.points.iter().filter(|(x, y)| finite(*x) && finite(*y)) {
            let p = (xa.map(x, x0, x1), ya.map(y, y1, y0));
            c.line(prev.unwrap_or(p), p, s.color);
            prev = Some(p);
        }
        // A lone point would be a 2x2 dot; a marker makes it visible.
        if let (Some((px, py)), 1) = (prev, s.points.iter().filter(|(x, y)| finite(*x) && finite(*y)).count()) {
            c.fill(px - 2, py - 2, px + 3, py + 3, s.color);
        }
    }
    c.clip = (0, 0, w - 1, h - 1);

    // Axes go on top of the curves so the frame stays unbroken.
    c.fill(x0, y0, x0, y1, AXIS);
    c.fill(x0, y1, x1, y1, AXIS);
    let mut free_from = i64::MIN;
    for (v, s) in &xt {
        let px = xa.map(*v, x0, x1);
        c.fill(px, y1 + 1, px, y1 + tick, AXIS);
        let lx = px - text_width(s, sc) / 2;
        if lx > free_from {
            c.text(lx, y1 + tick + pad, s, sc, TEXT);
            free_from = lx + text_width(s, sc) + 2 * sc;
        }
    }
    for (v, s) in &yt {
        let py = ya.map(*v, y1, y0);
        c.fill(x0 - tick, py, x0 - 1, py, AXIS);
        c.text(x0 - tick - pad - text_width(s, sc), py - ch / 2, s, sc, TEXT);
    }
    c.text((x0 + x1 - text_width("step", sc)) / 2, y1 + tick + 3 * pad + ch, "step", sc, TEXT);
    c.text(x0 - 2 * sc, y0 - pad - ch, "loss", sc, TEXT);
    c.text((w - text_width(title, sc)) / 2, pad, title, sc, TEXT);

    // Legend in the top-right corner of the plot area, on white so curves do not cross it.
    let lw = series.iter().map(|s| text_width(&s.label, sc)).max().unwrap_or(0) + 4 * pad + 12 * sc;
    let (lx0, ly0) = (x1 - pad - lw, y0 + pad);
    let ly1 = ly0 + pad + series.len() as i64 * (ch + pad);
    if !series.is_empty() {
        c.fill(lx0, ly0, lx0 + lw, ly1, [200, 200, 200]);
        c.fill(lx0 + 1, ly0 + 1, lx0 + lw - 1, ly1 - 1, [255, 255, 255]);
    }
    for (i, s) in series.iter().enumerate() {
        let ty = ly0 + pad + i as i64 * (ch + pad);
        c.line((lx0 + pad, ty + ch / 2), (lx0 + pad + 12 * sc, ty + ch / 2), s.color);
        c.text(lx0 + 2 * pad + 12 * sc, ty, &s.label, sc, TEXT);
    }
    c.rgb
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

    #[test]
    fn ticks_are_4_to_6_round_steps_covering_the_data() {
        // Hard cases by hand (7 ticks at one step, 3 at the next), then xorshift-random ranges.
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
            let ax = Axis::nice(lo, hi);
            let step = ax.m as f64 * 10f64.powi(ax.e);
            let n = ax.k1 - ax.k0 + 1;
            assert!((4..=6).contains(&n) && [1, 2, 5].contains(&ax.m), "{lo}..{hi}: {ax:?}");
            // Equal ends are padded to a span of at most 0.2 * |value| (or 2 near zero).
            let span = if hi - lo > 1e-9 * hi.abs().max(lo.abs()) { hi - lo } else { 0.2 * hi.abs().max(10.0) };
            assert!(ax.lo <= lo && ax.hi >= hi && ax.hi - ax.lo <= span + 2.0 * step, "{lo}..{hi}: {ax:?}");
            let inside = |v: f64| v >= ax.lo - 1e-9 * step && v <= ax.hi + 1e-9 * step;
            assert!(ax.ticks().all(|(v, _)| inside(v)), "{lo}..{hi}: a tick outside {ax:?}");
        }
    }

    #[test]
    fn labels_are_exact() {
        let labels = |lo, hi| Axis::nice(lo, hi).ticks().map(|(_, s)| s).collect::<Vec<_>>();
        assert_eq!(labels(0.0, 100000.0), ["0", "20000", "40000", "60000", "80000", "100000"]);
        assert_eq!(labels(0.0, 0.3), ["0", "0.1", "0.2", "0.3"]);
        assert_eq!(labels(0.0, 3e-6), ["0", "1e-6", "2e-6", "3e-6"]);
        assert_eq!(labels(0.0, 2.5e7), ["0", "5e6", "1e7", "1.5e7", "2e7", "2.5e7"]);
        assert_eq!(labels(-0.3, 0.0), ["-0.3", "-0.2", "-0.1", "0"]);
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
        // of its span on each side, and [-0.4, 10.4] already holds 6 ticks (0..10 by 2).
        let map = |x: f64, y: f64| {
            let (ylo, yhi) = (-10.0 * Y_PAD, 10.0 + 10.0 * Y_PAD);
            (x0 as f64 + x / 100.0 * (x1 - x0) as f64, y1 as f64 - (y - ylo) / (yhi - ylo) * (y1 - y0) as f64)
        };
        for (x, y, c) in [(50.0, 0.0, BLUE), (25.0, 5.0, BLUE), (75.0, 5.0, BLUE), (10.0, 5.0, ORANGE)] {
            let (mx, my) = map(x, y);
            assert!(near(&img, w, mx, my, c), "no {c:?} pixel near ({mx}, {my}) for ({x}, {y})");
        }
        // And not elsewhere: the bottom of the V is far from the top of the plot.
        let (mx, my) = map(50.0, 9.0);
        assert!(!near(&img, w, mx, my, BLUE));
        // Lines are 2 px thick: a vertical cut through the flat val line meets 2 orange pixels.
        let (mx, _) = map(90.0, 5.0);
        assert_eq!((y0..=y1).filter(|&y| px(&img, w, mx as i64, y) == ORANGE).count(), 2);
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
