//! The picture of who may reach whom: the policy graph's sources on the
//! left, destinations on the right, an arrow per allowed direction labelled
//! with its ports. Pure: edges in, SVG text out. Inline SVG with
//! presentation attributes only (the CSP allows no inline style and no
//! script); every text escaped.

use ztmesh_proto::admin as apb;

use crate::web::html::esc;

const ROW: usize = 46;
const BOX_W: usize = 210;
const BOX_H: usize = 32;
const GAP: usize = 380;
const MARGIN: usize = 16;
/// Longer selector names are cut (the table below the picture has them whole).
const MAX_LABEL: usize = 28;

/// The SVG of `edges` (an empty policy: a note instead).
pub fn svg(edges: &[apb::PolicyEdge]) -> String {
    if edges.is_empty() {
        return "<p id=\"graph-empty\">The policy in force allows nothing: no node may reach another.</p>"
            .into();
    }
    let srcs = unique(edges.iter().map(|e| (e.src.as_str(), e.src_nodes)));
    let dsts = unique(edges.iter().map(|e| (e.dst.as_str(), e.dst_nodes)));
    let rows = srcs.len().max(dsts.len());
    let width = 2 * MARGIN + 2 * BOX_W + GAP;
    let height = 2 * MARGIN + rows * ROW;
    let y = |i: usize| MARGIN + i * ROW;
    let (left, right) = (MARGIN, MARGIN + BOX_W + GAP);
    let mut out = format!(
        "<svg id=\"graph\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" \
         width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"who may reach whom\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" \
         markerHeight=\"8\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" \
         fill=\"#2553c7\"/></marker></defs>"
    );
    for e in edges {
        let (Some(s), Some(d)) = (
            srcs.iter().position(|(n, _)| *n == e.src),
            dsts.iter().position(|(n, _)| *n == e.dst),
        ) else {
            continue;
        };
        let (x1, y1) = (left + BOX_W, y(s) + BOX_H / 2);
        let (x2, y2) = (right, y(d) + BOX_H / 2);
        // The label sits on the line, nearer the destination, so labels of
        // edges from one source fan out.
        let (lx, ly) = (x1 + (x2 - x1) * 13 / 20, (y1 * 7 + y2 * 13) / 20);
        let dash = if e.postures.is_empty() {
            ""
        } else {
            " stroke-dasharray=\"6 4\""
        };
        out.push_str(&format!(
            "<g class=\"edge\"><title>{} → {} {} ({})</title>\
             <line x1=\"{x1}\" y1=\"{y1}\" x2=\"{x2}\" y2=\"{y2}\" stroke=\"#2553c7\" \
             stroke-width=\"1.5\" marker-end=\"url(#arrow)\"{dash}/>\
             <text x=\"{lx}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#1d2330\" \
             stroke=\"#fff\" stroke-width=\"3\" paint-order=\"stroke\">{}</text></g>",
            esc(&e.src),
            esc(&e.dst),
            esc(&e.ports),
            esc(&e.rule_id),
            ly.saturating_sub(3),
            esc(&cut(&e.ports))
        ));
    }
    for (col, x, names) in [("src", left, &srcs), ("dst", right, &dsts)] {
        for (i, (name, nodes)) in names.iter().enumerate() {
            out.push_str(&format!(
                "<g class=\"{col}\"><title>{} ({nodes} node{})</title>\
                 <rect x=\"{x}\" y=\"{}\" width=\"{BOX_W}\" height=\"{BOX_H}\" rx=\"5\" \
                 fill=\"#eef2fb\" stroke=\"#6b7280\"/>\
                 <text x=\"{}\" y=\"{}\" font-size=\"13\" fill=\"#1d2330\">{} \
                 <tspan fill=\"#6b7280\">· {nodes}</tspan></text></g>",
                esc(name),
                if *nodes == 1 { "" } else { "s" },
                y(i),
                x + 8,
                y(i) + BOX_H / 2 + 5,
                esc(&cut(name)),
            ));
        }
    }
    out.push_str("</svg>");
    out
}

/// Names in first-seen order with their node counts, each once.
fn unique<'a>(names: impl Iterator<Item = (&'a str, u32)>) -> Vec<(&'a str, u32)> {
    let mut out: Vec<(&str, u32)> = Vec::new();
    for (n, c) in names {
        if !out.iter().any(|(m, _)| *m == n) {
            out.push((n, c));
        }
    }
    out
}

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_LABEL {
        return s.to_string();
    }
    let mut t: String = s.chars().take(MAX_LABEL - 1).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(src: &str, dst: &str, ports: &str, postures: &[&str]) -> apb::PolicyEdge {
        apb::PolicyEdge {
            src: src.into(),
            dst: dst.into(),
            ports: ports.into(),
            rule_id: "policy.hujson:3".into(),
            postures: postures.iter().map(|p| (*p).to_string()).collect(),
            src_nodes: 2,
            dst_nodes: 1,
        }
    }

    #[test]
    fn graph_draws_each_selector_once_and_an_arrow_per_edge() {
        let edges = [
            edge("group:eng", "tag:web", "tcp:443", &[]),
            edge("group:eng", "tag:db", "tcp:5432", &["posture:ok"]),
            edge("tag:web", "tag:db", "tcp:5432", &[]),
        ];
        let s = svg(&edges);
        assert_eq!(s.matches("<g class=\"src\">").count(), 2);
        assert_eq!(s.matches("<g class=\"dst\">").count(), 2);
        assert_eq!(s.matches("<line ").count(), 3);
        assert_eq!(s.matches("stroke-dasharray").count(), 1, "posture-gated");
        assert!(s.contains(">tcp:5432</text>"));
        assert!(!s.contains("style="), "no inline style (CSP)");
        assert!(!s.contains("<script"));
    }

    #[test]
    fn graph_escapes_what_the_policy_names_and_cuts_long_names() {
        let long = "x".repeat(60);
        let s = svg(&[edge("<script>alert(1)</script>", &long, "tcp:1&2", &[])]);
        assert!(!s.contains("<script>"));
        assert!(s.contains("&lt;script&gt;"));
        assert!(s.contains("tcp:1&amp;2"));
        assert!(s.contains(&format!("{}…", "x".repeat(MAX_LABEL - 1))));
        assert!(svg(&[]).contains("id=\"graph-empty\""));
    }
}
