//! Peer-supplied text in logs and error messages: bounded and escaped.
//!
//! A service name or status message comes from the other side of a connection; logging it whole lets a
//! peer write 8 KB into every log line, or forge lines with control characters. [`clip`] shows at most
//! [`LIMIT`] characters, escapes control characters, and says how long the original was.

use std::fmt;

/// Most characters of peer-supplied text shown.
pub const LIMIT: usize = 128;

/// Peer-supplied text, displayed bounded and escaped (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Clipped<'a>(&'a str);

/// Wraps `s` for display in a log line or message.
pub fn clip(s: &str) -> Clipped<'_> {
    Clipped(s)
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars().take(LIMIT) {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        if self.0.chars().nth(LIMIT).is_some() {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_unchanged_long_text_is_cut_with_its_length() {
        assert_eq!(clip("echo").to_string(), "echo");
        let long = "x".repeat(8000);
        let shown = clip(&long).to_string();
        assert_eq!(shown, format!("{}…(8000 bytes)", "x".repeat(LIMIT)));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            clip("a\nINFO forged\r\x1b[31m").to_string(),
            "a\\nINFO forged\\r\\u{1b}[31m"
        );
    }
}
