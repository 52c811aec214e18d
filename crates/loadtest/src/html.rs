//! The report as one self-contained HTML page: no scripts, no external files, charts drawn as
//! inline SVG (offered against completed, shed and refused per second; each second's latency p50
//! and p99; saturation when scraped), the faults injected during the run drawn as numbered bands
//! over every chart and listed, and the per-phase, per-tier table with latency percentiles, so it
//! can be attached to a launch review as it is.

use std::fmt::Write;

use crate::report::{FaultWindow, OutcomeKind, Report, Second};

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 260.0;
const MARGIN: f64 = 40.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A chart line: its name, its colour and the value it reads from each second.
type Series<'a> = (&'a str, &'a str, fn(&Second) -> f64);

/// Fault windows' colour (a translucent band over the plot area, behind the lines).
const FAULT_FILL: &str = "#cf222e";

/// One polyline per series over the timeline, with axes, a legend, and each fault as a band
/// labelled with its number in the fault table. `unit` follows the peak on the y axis.
fn chart(
    title: &str,
    unit: &str,
    timeline: &[Second],
    faults: &[FaultWindow],
    series: &[Series<'_>],
) -> String {
    let mut svg = String::new();
    let peak = timeline
        .iter()
        .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
        .fold(0.0, f64::max);
    let peak = if peak > 0.0 { peak } else { 1.0 };
    let seconds = timeline.len().max(2) as f64 - 1.0;
    let x = |t: f64| MARGIN + (WIDTH - 2.0 * MARGIN) * t.clamp(0.0, seconds) / seconds;
    let y = |v: f64| HEIGHT - MARGIN - (HEIGHT - 2.0 * MARGIN) * v / peak;
    let _ = write!(
        svg,
        r##"<h2>{}</h2><svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{}">"##,
        escape(title),
        escape(title)
    );
    for (n, fault) in faults.iter().enumerate() {
        // An instant fault (a kill) still shows, as a band one second wide.
        let (left, right) = (x(fault.from), x(fault.to.max(fault.from + 1.0)));
        let _ = write!(
            svg,
            r##"<g class="fault"><title>{}</title><rect x="{left:.1}" y="{MARGIN}" width="{w:.1}" height="{h}" fill="{FAULT_FILL}" fill-opacity="0.12"/><text x="{left:.1}" y="{ty}" font-size="10" fill="{FAULT_FILL}">F{}</text></g>"##,
            escape(&fault.name),
            n + 1,
            w = right - left,
            h = HEIGHT - 2.0 * MARGIN,
            ty = MARGIN - 3.0 - 10.0 * (n % 2) as f64,
        );
    }
    let peak_label = if peak >= 10.0 {
        format!("{peak:.0}")
    } else {
        format!("{peak:.2}")
    };
    let _ = write!(
        svg,
        r##"<line x1="{MARGIN}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/><line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{b}" stroke="#888"/><text x="4" y="{t}" font-size="11">{peak_label}{unit}</text><text x="{r}" y="{bl}" font-size="11" text-anchor="end">{secs} s</text>"##,
        b = HEIGHT - MARGIN,
        r = WIDTH - MARGIN,
        t = MARGIN + 4.0,
        bl = HEIGHT - MARGIN + 16.0,
        secs = seconds as usize,
        unit = escape(unit),
    );
    for (n, (name, colour, value)) in series.iter().enumerate() {
        let points: Vec<String> = timeline
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{:.1},{:.1}", x(i as f64), y(value(s))))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/><rect x="{lx}" y="8" width="10" height="10" fill="{colour}"/><text x="{tx}" y="17" font-size="12">{}</text>"##,
            points.join(" "),
            escape(name),
            lx = MARGIN + 130.0 * n as f64,
            tx = MARGIN + 14.0 + 130.0 * n as f64,
        );
    }
    svg.push_str("</svg>");
    svg
}

fn seconds(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.2}"))
}

/// The whole page.
pub fn render(report: &Report) -> String {
    let mut page = String::new();
    let title = format!("Kiln load test: {}", report.scenario);
    let n = |k: OutcomeKind| report.totals.outcomes.get(&k).copied().unwrap_or(0);
    let _ = write!(
        page,
        r##"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{t}</title><style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f4f4f4}}.bad{{color:#b00}}</style></head><body><h1>{t}</h1>"##,
        t = escape(&title)
    );
    let _ = write!(
        page,
        r##"<p>Sent {} = completed {} + shed {} + quota-refused {} + policy-refused {} + errors {}: <strong class="{}">{}</strong></p>"##,
        report.sent,
        n(OutcomeKind::Completed),
        n(OutcomeKind::Shed),
        n(OutcomeKind::QuotaRefused),
        n(OutcomeKind::PolicyRefused),
        n(OutcomeKind::Error),
        if report.accounted { "" } else { "bad" },
        if report.accounted {
            "every request accounted for"
        } else {
            "NOT every request accounted for"
        }
    );
    let faults = &report.faults;
    page.push_str(&chart(
        "Requests per second: offered, completed, shed, refused",
        "/s",
        &report.timeline,
        faults,
        &[
            ("offered", "#555", |s| s.offered as f64),
            ("completed", "#1a7f37", |s| s.completed as f64),
            ("shed", "#cf222e", |s| s.shed as f64),
            ("refused", "#bf8700", |s| s.refused as f64),
            ("errors", "#8250df", |s| s.errors as f64),
        ],
    ));
    if report.timeline.iter().any(|s| s.latency_p99.is_some()) {
        page.push_str(&chart(
            "Latency of the requests completed each second: p50, p99",
            " s",
            &report.timeline,
            faults,
            &[
                ("p50", "#0969da", |s| s.latency_p50.unwrap_or(0.0)),
                ("p99", "#cf222e", |s| s.latency_p99.unwrap_or(0.0)),
            ],
        ));
    }
    if report.timeline.iter().any(|s| s.saturation.is_some()) {
        page.push_str(&chart(
            "Cluster: batch slots in use (per mille) and waiting jobs",
            "",
            &report.timeline,
            faults,
            &[
                ("saturation x1000", "#0969da", |s| {
                    s.saturation.unwrap_or(0.0) * 1000.0
                }),
                ("waiting", "#cf222e", |s| s.waiting.unwrap_or(0.0)),
            ],
        ));
    }
    if !faults.is_empty() {
        page.push_str("<h2>Faults injected</h2><table><tr><th>mark</th><th>from s</th><th>to s</th><th>fault</th></tr>");
        for (n, fault) in faults.iter().enumerate() {
            let _ = write!(
                page,
                "<tr><td>F{}</td><td>{:.1}</td><td>{:.1}</td><td style=\"text-align:left\">{}</td></tr>",
                n + 1,
                fault.from,
                fault.to,
                escape(&fault.name)
            );
        }
        page.push_str("</table>");
    }
    page.push_str(
        "<h2>Per phase and tier</h2><table><tr><th>phase</th><th>tier</th><th>sent</th><th>completed</th><th>shed</th><th>quota-refused</th><th>policy-refused</th><th>errors</th><th>images/s</th><th>goodput/s</th><th>latency p50 / p90 / p99 s</th><th>first progress p50 / p99 s</th></tr>",
    );
    for (phase, tiers) in &report.phases {
        for (tier, f) in tiers {
            let c = |k: OutcomeKind| f.outcomes.get(&k).copied().unwrap_or(0);
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{} / {} / {}</td><td>{} / {}</td></tr>",
                escape(phase),
                escape(tier),
                f.sent,
                c(OutcomeKind::Completed),
                c(OutcomeKind::Shed),
                c(OutcomeKind::QuotaRefused),
                c(OutcomeKind::PolicyRefused),
                c(OutcomeKind::Error),
                f.throughput,
                f.goodput,
                seconds(f.latency.as_ref().map(|l| l.p50)),
                seconds(f.latency.as_ref().map(|l| l.p90)),
                seconds(f.latency.as_ref().map(|l| l.p99)),
                seconds(f.first_progress.as_ref().map(|l| l.p50)),
                seconds(f.first_progress.as_ref().map(|l| l.p99)),
            );
        }
    }
    page.push_str("</table>");
    if !report.error_codes.is_empty() {
        page.push_str("<h2>Errors by code</h2><ul>");
        for (code, count) in &report.error_codes {
            let _ = write!(page, "<li>{}: {count}</li>", escape(code));
        }
        page.push_str("</ul>");
    }
    page.push_str("</body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{default_deadlines, Outcome};
    use crate::Scenario;

    #[test]
    fn the_page_is_self_contained_and_carries_the_figures() {
        let scenario = Scenario::from_toml(
            "name = \"<spike>\"\n[population]\nusers = 2\ntiers = { free = 1.0 }\n[[phases]]\nname = \"p\"\nseconds = 3\nrate = 1\n",
        )
        .unwrap();
        let outcomes = vec![Outcome {
            sent_at: 0.5,
            phase: 0,
            user: 0,
            tier: "free",
            kind: OutcomeKind::Completed,
            code: None,
            first_progress: Some(0.2),
            latency: 1.25,
        }];
        let page = render(&Report::build(
            &scenario,
            1,
            &outcomes,
            &default_deadlines(),
        ));
        assert!(page.contains("&lt;spike&gt;"), "titles are escaped");
        assert!(page.contains("<polyline"));
        assert!(page.contains("every request accounted for"));
        assert!(page.contains("1.25"));
        assert!(!page.contains("<script"), "no scripts");
        assert!(!page.contains("src="), "no external resources");
        assert!(page.contains("Latency of the requests completed"));
        assert!(
            !page.contains("Faults injected"),
            "no faults, no fault table"
        );
    }

    #[test]
    fn faults_are_drawn_over_every_chart_and_listed() {
        let scenario = Scenario::from_toml(
            "name = \"s\"\n[population]\nusers = 2\ntiers = { free = 1.0 }\n[[phases]]\nname = \"p\"\nseconds = 20\nrate = 1\n",
        )
        .unwrap();
        let outcomes: Vec<Outcome> = (0..20)
            .map(|i| Outcome {
                sent_at: i as f64,
                phase: 0,
                user: 0,
                tier: "free",
                kind: OutcomeKind::Completed,
                code: None,
                first_progress: None,
                latency: 0.5,
            })
            .collect();
        let mut report = Report::build(&scenario, 20, &outcomes, &default_deadlines());
        report.add_faults([
            FaultWindow::parse("kill -9 <worker-0>@5").unwrap(),
            FaultWindow::parse("etcd down@8-12").unwrap(),
        ]);
        let page = render(&report);
        // Two charts (requests, latency), each with both bands.
        assert_eq!(page.matches("<g class=\"fault\">").count(), 4);
        assert!(page.contains("<title>kill -9 &lt;worker-0&gt;</title>"));
        assert!(page.contains("<td>F2</td><td>8.0</td><td>12.0</td>"));
        // The band of the 4-second window is four seconds of the 20-second axis wide.
        let width = (WIDTH - 2.0 * MARGIN) * 4.0 / 20.0;
        assert!(
            page.contains(&format!("width=\"{width:.1}\"")),
            "{width:.1}"
        );
    }
}
