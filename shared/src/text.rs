//! Text that came from outside (a VM's files, the queue, the network) on its way to an operator's
//! terminal or log: control characters are escaped so that nothing an input says can move the
//! cursor, clear the screen, rewrite an earlier line, hide text (bidirectional overrides) or forge
//! a line of its own.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` must not reach a terminal as it is: C0 controls, DEL, C1 controls, and the Unicode
/// format characters that reorder or hide text (bidirectional embeddings, overrides and isolates,
/// zero-width joiners, the BOM and the line/paragraph separators).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

fn escape_with(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    let keep = |c: char| keep_newlines && (c == '\n' || c == '\t');
    if !s.chars().any(|c| is_unsafe(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !is_unsafe(c) || keep(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// One line of outside text (a name, a path, a reason): every control character is escaped,
/// newlines and tabs included.
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_with(s, false)
}

/// A multi-line message (an error text whose line breaks are its own): like [`escape`] but line
/// feeds and tabs stay. Carriage returns, escape sequences and the rest are escaped.
pub fn escape_lines(s: &str) -> Cow<'_, str> {
    escape_with(s, true)
}

/// Displays a path or name from outside with [`escape`] applied: `format!("{}", Esc(&path))`.
pub struct Esc<'a, T: ?Sized>(pub &'a T);

impl fmt::Display for Esc<'_, str> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

impl fmt::Display for Esc<'_, String> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

impl fmt::Display for Esc<'_, std::path::Path> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(&self.0.to_string_lossy()))
    }
}

impl fmt::Display for Esc<'_, std::path::PathBuf> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Esc(self.0.as_path()).fmt(f)
    }
}

/// A short free-text field from outside (a cancel reason): escaped, and cut to `max` characters
/// with an ellipsis.
pub fn bounded(s: &str, max: usize) -> String {
    let esc = escape(s.trim());
    let mut out: String = esc.chars().take(max).collect();
    if esc.chars().count() > max {
        out.push('…');
    }
    out
}

/// Escape `& < > " '` for XML and HTML text and attribute values (control characters are the
/// caller's business: escape them first with [`escape`] when they may occur).
pub fn markup_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_obey() {
        assert!(matches!(escape("plain name-1.vmdk"), Cow::Borrowed(_)));
        assert_eq!(escape("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape("line\nfake: ok"), "line\\nfake: ok");
        assert_eq!(escape("c1\u{9b}31m"), "c1\\u{9b}31m");
        assert_eq!(escape("rtl\u{202e}gpj.exe"), "rtl\\u{202e}gpj.exe");
        assert_eq!(escape("del\u{7f}"), "del\\u{7f}");
        assert_eq!(escape("Ünïcode ok"), "Ünïcode ok");
        assert_eq!(escape_lines("first\nsecond\r\u{1b}]0;x\u{7}"), "first\nsecond\\r\\u{1b}]0;x\\u{7}");
        assert_eq!(format!("{}", Esc(std::path::Path::new("/x/\u{1b}y"))), "/x/\\u{1b}y");
        assert_eq!(bounded("  abc\ndef  ", 5), "abc\\n…");
        assert_eq!(bounded("ok", 5), "ok");
    }
}
