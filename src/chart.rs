//! Charts of a window hour by hour: how full it is and how many slots free, as unicode bars for
//! a terminal and as an SVG for a browser (`waquota inspect --chart`, `waquota plan`).

use std::fmt::Write;

use crate::model::{HOUR_MS, Millis};

/// One hour: the window's occupancy and the slots that free within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hour {
    pub start: Millis,
    /// Slots held (at the hour's start for a live window, at its end for a plan).
    pub used: u64,
    pub freed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chart {
    pub title: String,
    /// The effective limit the occupancy is drawn against; 0 = unlimited (drawn against the
    /// largest occupancy).
    pub limit: u64,
    pub hours: Vec<Hour>,
}

/// The next `n` hours of a live window from the expiries of its slots: occupancy at each hour's
/// start, and the slots whose expiry falls within the hour (a slot is free at its expiry).
pub fn window_hours(now: Millis, expiries: &[Millis], n: usize) -> Vec<Hour> {
    (0..n as i64)
        .map(|k| {
            let start = now + k * HOUR_MS;
            Hour {
                start,
                used: expiries.iter().filter(|e| **e > start).count() as u64,
                freed: expiries
                    .iter()
                    .filter(|e| **e > start && **e <= start + HOUR_MS)
                    .count() as u64,
            }
        })
        .collect()
}

const EIGHTHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];

/// A bar of `value / max` of `width` cells, in eighths of a cell.
fn bar(value: u64, max: u64, width: usize) -> String {
    let eighths = if max == 0 {
        0
    } else {
        ((value.min(max) as u128 * width as u128 * 8) / max as u128) as usize
    };
    let mut s = "█".repeat(eighths / 8);
    if eighths % 8 > 0 {
        s.push(EIGHTHS[eighths % 8]);
    }
    let cells = s.chars().count();
    s.push_str(&" ".repeat(width.saturating_sub(cells)));
    s
}

/// `HH:MM` in UTC.
fn clock(ms: Millis) -> String {
    let m = ms.rem_euclid(crate::model::DAY_MS) / 60_000;
    format!("{:02}:{:02}", m / 60, m % 60)
}

impl Chart {
    fn scale(&self) -> u64 {
        if self.limit > 0 {
            self.limit
        } else {
            self.hours.iter().map(|h| h.used).max().unwrap_or(0).max(1)
        }
    }

    /// Unicode bars, one line per hour: occupancy against the limit, then slots freeing.
    pub fn terminal(&self) -> String {
        const USED_W: usize = 32;
        const FREED_W: usize = 16;
        let scale = self.scale();
        let most_freed = self.hours.iter().map(|h| h.freed).max().unwrap_or(0).max(1);
        let limit = if self.limit > 0 {
            self.limit.to_string()
        } else {
            "unlimited".into()
        };
        let mut out = format!(
            "{}\n{:<5}  {:<USED_W$} {:>13}  {:<FREED_W$} {:>6}\n",
            self.title,
            "hour",
            "occupancy",
            format!("used/{limit}"),
            "slots freeing",
            "freed"
        );
        for h in &self.hours {
            let _ = writeln!(
                out,
                "{}  {}│{:>13}  {}│{:>6}",
                clock(h.start),
                bar(h.used, scale, USED_W),
                format!("{}/{}", h.used, limit),
                bar(h.freed, most_freed, FREED_W),
                h.freed
            );
        }
        out
    }

    /// The same chart as a standalone SVG: occupancy bars with the limit drawn as a line, and the
    /// slots freeing each hour below them.
    pub fn svg(&self) -> String {
        let n = self.hours.len().max(1) as f64;
        let (w, left, right) = (960.0, 70.0, 20.0);
        let plot_w = w - left - right;
        let slot = plot_w / n;
        let (top_y, top_h, low_y, low_h) = (50.0, 220.0, 320.0, 110.0);
        let scale = self.scale() as f64;
        let most_freed = self.hours.iter().map(|h| h.freed).max().unwrap_or(0).max(1) as f64;
        let mut s = String::new();
        let _ = write!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"480\" \
             viewBox=\"0 0 {w} 480\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n\
             <text x=\"{left}\" y=\"24\" font-size=\"16\" fill=\"#111\">{}</text>\n\
             <text x=\"{left}\" y=\"{}\" fill=\"#333\">occupancy (slots held{})</text>\n\
             <text x=\"{left}\" y=\"{}\" fill=\"#333\">slots freeing in the hour</text>\n",
            escape(&self.title),
            top_y - 6.0,
            if self.limit > 0 {
                format!(", limit {}", self.limit)
            } else {
                String::new()
            },
            low_y - 6.0,
        );
        for (k, h) in self.hours.iter().enumerate() {
            let x = left + k as f64 * slot + 1.0;
            let bw = (slot - 2.0).max(1.0);
            let uh = top_h * (h.used as f64 / scale).min(1.0);
            let fh = low_h * (h.freed as f64 / most_freed);
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{uh:.1}\" fill=\"#2f6fbf\"><title>{} used {}</title></rect>\n\
                 <rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{fh:.1}\" fill=\"#2e9e5b\"><title>{} freed {}</title></rect>",
                top_y + top_h - uh,
                clock(h.start),
                h.used,
                low_y + low_h - fh,
                clock(h.start),
                h.freed,
            );
            if k % 3 == 0 {
                let _ = writeln!(
                    s,
                    "<text x=\"{x:.1}\" y=\"{:.1}\" fill=\"#333\">{}</text>",
                    low_y + low_h + 16.0,
                    clock(h.start)
                );
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"4\" y=\"{:.1}\" fill=\"#2e9e5b\">{most_freed}</text>",
            low_y + 4.0
        );
        if self.limit > 0 {
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{top_y}\" y2=\"{top_y}\" stroke=\"#c0392b\" stroke-dasharray=\"6 4\"/>\n\
                 <text x=\"4\" y=\"{:.1}\" fill=\"#c0392b\">{}</text>",
                left + plot_w,
                top_y + 4.0,
                self.limit
            );
        }
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\n\
             <line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\n</svg>",
            left + plot_w,
            top_y + top_h,
            top_y + top_h,
            left + plot_w,
            low_y + low_h,
            low_y + low_h,
        );
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_drawn_in_eighths_against_the_scale() {
        assert_eq!(bar(0, 8, 2), "  ");
        assert_eq!(bar(8, 8, 2), "██");
        assert_eq!(bar(1, 16, 2), "▏ ");
        assert_eq!(bar(9, 16, 2), "█▏");
        assert_eq!(bar(99, 8, 2), "██", "capped at the scale");
    }

    #[test]
    fn window_hours_count_occupancy_and_slots_freeing() {
        let now = 10 * HOUR_MS;
        let expiries = [now + 1, now + HOUR_MS, now + HOUR_MS + 1, now + 5 * HOUR_MS];
        let h = window_hours(now, &expiries, 3);
        assert_eq!(
            h.iter().map(|h| (h.used, h.freed)).collect::<Vec<_>>(),
            vec![(4, 2), (2, 1), (1, 0)]
        );
        assert_eq!(h[1].start, now + HOUR_MS);
    }
}
