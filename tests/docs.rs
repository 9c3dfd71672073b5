//! The documentation's relative links resolve: every `[x](path)`, `[x](path#anchor)` and
//! `[x](#anchor)` in the README and the other documents names a file that exists and, for a
//! markdown file, a heading it has (GitHub's anchor rule). A moved section otherwise leaves
//! links that still render but lead nowhere, which no reader reports.
//!
//! Also: the README stays a front door, at most 300 lines; the reference lives in docs/.

use std::collections::HashMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

const README_MAX_LINES: usize = 300;

/// Documents that are linked to before they are in the tree: a link to one of them (or into
/// it) is accepted while it is absent, and checked like any other once it exists.
const MAY_BE_ABSENT: &[&str] = &["docs/worker-guide.md", "clients/python"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The documents whose links are checked, relative to the repository root.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut docs: Vec<PathBuf> = ["README.md", "BENCHMARKS.md", "FAULTS.md"]
        .iter()
        .map(PathBuf::from)
        .collect();
    for dir in ["docs", "clients", "examples", "tests/webhooks"] {
        collect_markdown(&root, Path::new(dir), &mut docs);
    }
    docs.sort();
    docs.dedup();
    docs
}

fn collect_markdown(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(root.join(dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Virtual environments, build output and caches hold other projects' documents.
        if name.starts_with('.')
            || matches!(
                name.as_str(),
                "node_modules" | "target" | "build" | "dist" | "__pycache__" | "venv"
            )
            || name.ends_with(".egg-info")
        {
            continue;
        }
        let rel = dir.join(&name);
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            collect_markdown(root, &rel, out);
        } else if name.ends_with(".md") {
            out.push(rel);
        }
    }
}

/// A link found in a document: its 1-based line and its target as written.
#[derive(Debug)]
struct Link {
    line: usize,
    target: String,
}

/// Lines that are markdown text: those of fenced code blocks are blanked, so that neither
/// their links nor their `#` comments count.
fn prose_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |m| trimmed.chars().take_while(|c| *c == m).count());
        match (fence, marker) {
            (None, Some(m)) if run >= 3 => {
                fence = Some((m, run));
                out.push(String::new());
            }
            (Some((m, n)), Some(c))
                if c == m && run >= n && trimmed[run * c.len_utf8()..].trim().is_empty() =>
            {
                fence = None;
                out.push(String::new());
            }
            (Some(_), _) => out.push(String::new()),
            (None, _) => out.push(line.to_string()),
        }
    }
    out
}

/// Removes inline code spans, whose brackets and parentheses are not markdown.
fn without_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '`' {
            let run = chars[i..].iter().take_while(|c| **c == '`').count();
            // The span ends at the next run of exactly as many backticks.
            let mut j = i + run;
            let mut end = None;
            while j < chars.len() {
                if chars[j] == '`' {
                    let r = chars[j..].iter().take_while(|c| **c == '`').count();
                    if r == run {
                        end = Some(j + r);
                        break;
                    }
                    j += r;
                } else {
                    j += 1;
                }
            }
            match end {
                Some(e) => {
                    // Keep the span's length visible as text, so that link text stays text.
                    out.push_str("code");
                    i = e;
                }
                None => {
                    out.extend(&chars[i..i + run]);
                    i += run;
                }
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// Every inline link and image of a document, outside code. A link's text may run over
/// several lines of one paragraph; its line is the one where it starts.
fn links(text: &str) -> Vec<Link> {
    let prose: Vec<String> = prose_lines(text)
        .iter()
        .map(|l| without_code_spans(l))
        .collect();
    let chars: Vec<char> = prose.join("\n").chars().collect();
    let line_of: Vec<usize> = chars
        .iter()
        .scan(1, |line, c| {
            let here = *line;
            if *c == '\n' {
                *line += 1;
            }
            Some(here)
        })
        .collect();
    // The index of the bracket that closes the one at `open`, within one paragraph.
    let closing = |open: usize, o: char, c: char| {
        let mut depth = 0;
        for (j, ch) in chars.iter().enumerate().skip(open) {
            if *ch == '\n' && chars.get(j + 1) == Some(&'\n') {
                return None;
            }
            if *ch == o {
                depth += 1;
            } else if *ch == c {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
        }
        None
    };
    let mut found = Vec::new();
    for i in 0..chars.len() {
        if chars[i] != '[' {
            continue;
        }
        let Some(close) = closing(i, '[', ']') else {
            continue;
        };
        if chars.get(close + 1) != Some(&'(') {
            continue;
        }
        let Some(end) = closing(close + 1, '(', ')') else {
            continue;
        };
        let inner: String = chars[close + 2..end].iter().collect();
        // A title ("…") may follow the destination; `<…>` may wrap it.
        let target = inner
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_string();
        // Link text may itself hold an image: the scan goes on inside it.
        found.push(Link {
            line: line_of[i],
            target,
        });
    }
    found
}

/// The text a heading renders as: code spans keep their text, links their label, and
/// emphasis markers and HTML tags go.
fn heading_text(raw: &str) -> String {
    let mut s = raw.trim().to_string();
    // A closing sequence of `#`s is not part of the heading.
    let trimmed = s.trim_end_matches('#');
    if trimmed.len() < s.len() && (trimmed.is_empty() || trimmed.ends_with(' ')) {
        s = trimmed.trim_end().to_string();
    }
    let mut out = String::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '`' => i += 1,
            '<' => match chars[i..].iter().position(|c| *c == '>') {
                Some(p) => i += p + 1,
                None => {
                    out.push('<');
                    i += 1;
                }
            },
            ']' if chars.get(i + 1) == Some(&'(') => {
                // Drop the link's destination, keep its label.
                match chars[i..].iter().position(|c| *c == ')') {
                    Some(p) => i += p + 1,
                    None => i += 1,
                }
            }
            '[' | ']' => i += 1,
            '!' if chars.get(i + 1) == Some(&'[') => i += 1,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// GitHub's anchor of a heading: lowercased, every character but letters, digits, `-`, `_`
/// and spaces dropped, spaces turned into `-`.
fn slug(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a document's headings (ATX and setext), duplicates numbered `-1`, `-2`, …
fn anchors(text: &str) -> Vec<String> {
    let lines = prose_lines(text);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let hashes = trimmed.chars().take_while(|c| *c == '#').count();
        let text = if indent <= 3
            && (1..=6).contains(&hashes)
            && (trimmed.len() == hashes || trimmed[hashes..].starts_with(' '))
        {
            Some(heading_text(&trimmed[hashes..]))
        } else if i + 1 < lines.len()
            && !trimmed.is_empty()
            && !trimmed.starts_with('|')
            && !trimmed.starts_with('-')
            && !trimmed.starts_with('>')
            && indent <= 3
            && is_setext_underline(&lines[i + 1])
            && (i == 0 || lines[i - 1].trim().is_empty())
        {
            Some(heading_text(trimmed))
        } else {
            None
        };
        if let Some(text) = text {
            let base = slug(&text);
            let n = seen.entry(base.clone()).or_insert(0);
            out.push(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
    }
    out
}

fn is_setext_underline(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && (t.chars().all(|c| c == '=') || (t.len() >= 2 && t.chars().all(|c| c == '-')))
}

/// `a/b/../c` → `a/c`, without touching the file system; `None` when it climbs out of the
/// repository.
fn normalise(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn may_be_absent(rel: &Path) -> bool {
    MAY_BE_ABSENT
        .iter()
        .any(|p| rel == Path::new(p) || rel.starts_with(p))
}

/// Every broken link of one document, as `file:line: …`.
fn check(root: &Path, doc: &Path, cache: &mut HashMap<PathBuf, Vec<String>>) -> Vec<String> {
    let text = fs::read_to_string(root.join(doc))
        .unwrap_or_else(|e| panic!("{}: cannot read: {e}", doc.display()));
    let mut problems = Vec::new();
    for link in links(&text) {
        let t = link.target.as_str();
        let where_ = format!("{}:{}", doc.display(), link.line);
        if t.is_empty() {
            problems.push(format!("{where_}: empty link target"));
            continue;
        }
        // http(s), mailto and any other scheme: not a file of this repository.
        let scheme = t.split_once(':').is_some_and(|(s, _)| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
                && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        });
        if scheme {
            continue;
        }
        let (path, anchor) = match t.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (t, None),
        };
        let rel = if path.is_empty() {
            doc.to_path_buf()
        } else {
            let joined = doc.parent().unwrap_or(Path::new("")).join(path);
            match normalise(&joined) {
                Some(p) => p,
                None => {
                    problems.push(format!("{where_}: {t}: leads out of the repository"));
                    continue;
                }
            }
        };
        let abs = root.join(&rel);
        if !abs.exists() {
            if !may_be_absent(&rel) {
                problems.push(format!("{where_}: {t}: {} does not exist", rel.display()));
            }
            continue;
        }
        let Some(anchor) = anchor else {
            continue;
        };
        if rel.extension().and_then(|e| e.to_str()) != Some("md") {
            // Line anchors of source files (#L10) are GitHub's, not headings.
            continue;
        }
        let known = cache
            .entry(rel.clone())
            .or_insert_with(|| anchors(&fs::read_to_string(&abs).unwrap_or_default()));
        if !known.iter().any(|a| a == anchor) {
            problems.push(format!(
                "{where_}: {t}: {} has no heading with anchor #{anchor}",
                rel.display()
            ));
        }
    }
    problems
}

#[test]
fn relative_links_resolve() {
    let root = root();
    let docs = documents();
    assert!(
        docs.iter().any(|d| d.starts_with("docs")),
        "no documents found under docs/"
    );
    let mut cache = HashMap::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in &docs {
        if !root.join(doc).exists() {
            problems.push(format!("{}: missing", doc.display()));
            continue;
        }
        checked += 1;
        problems.extend(check(&root, doc, &mut cache));
    }
    assert!(
        problems.is_empty(),
        "{} broken link(s) in {checked} documents:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn readme_is_a_front_door() {
    let text = fs::read_to_string(root().join("README.md")).expect("README.md");
    let lines = text.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines, more than {README_MAX_LINES}: move reference material to docs/"
    );
}

#[test]
fn slugs_follow_github() {
    assert_eq!(
        slug(&heading_text("`policy get` / `policy set`")),
        "policy-get--policy-set"
    );
    assert_eq!(
        slug(&heading_text("Failover, durability and a lost ledger")),
        "failover-durability-and-a-lost-ledger"
    );
    assert_eq!(
        slug(&heading_text("Tier projections and auto_tier")),
        "tier-projections-and-auto_tier"
    );
    assert_eq!(
        slug(&heading_text(
            "Reservations: Confirm, Release, ReportFailure"
        )),
        "reservations-confirm-release-reportfailure"
    );
    assert_eq!(
        slug(&heading_text("Why p99 ≤ 5 ms at 64 clients is not met")),
        "why-p99--5-ms-at-64-clients-is-not-met"
    );
    assert_eq!(
        anchors("# A\n\n## A\n\n```\n# not a heading\n```\n\nB\n---\n\n## A ##\n"),
        ["a", "a-1", "b", "a-2"]
    );
}

#[test]
fn links_outside_code_only() {
    let text = "See [a](x.md#y) and `[b](nope.md)`.\n\n```\n[c](nope.md)\n```\n[`d` e](#f \"t\") ![i](img.png)\n";
    let found: Vec<(usize, String)> = links(text)
        .into_iter()
        .map(|l| (l.line, l.target))
        .collect();
    assert_eq!(
        found,
        [
            (1, "x.md#y".to_string()),
            (6, "#f".to_string()),
            (6, "img.png".to_string())
        ]
    );
    let wrapped = "A [link over\ntwo lines](a.md#b).\n\n[not\n\na link](c.md)\n";
    let found: Vec<(usize, String)> = links(wrapped)
        .into_iter()
        .map(|l| (l.line, l.target))
        .collect();
    assert_eq!(found, [(1, "a.md#b".to_string())]);
}
