//! The crate's error type and the `file:line:col` diagnostic it renders.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong while reading a Dockerfile or a `.dockerignore`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem at a known place in a Dockerfile.
    #[error("{0}")]
    Syntax(Box<Diagnostic>),
    /// A variable expansion failed (`${V:?msg}`, a bad substitution, an unclosed quote)
    /// in a word that has no known place in a file.
    #[error("failed to process {word:?}: {message}")]
    Expand {
        /// The word being expanded.
        word: String,
        /// What went wrong.
        message: String,
    },
    /// A `.dockerignore` pattern that cannot be compiled.
    #[error("{path}: invalid pattern {pattern:?}: {message}")]
    IgnorePattern {
        /// The file the pattern came from (`<inline>` when parsed from a string).
        path: String,
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        message: String,
    },
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The diagnostic when this error has a place in a Dockerfile.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            Error::Syntax(d) => Some(d),
            _ => None,
        }
    }
}

/// A message tied to a place in a Dockerfile.
///
/// `Display` renders `file:line:col: message`, then the source line and a caret under the
/// column, the way compilers do, so a user sees at once what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The Dockerfile's name as the user gave it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// The text of `line` without its line ending (empty at end of file).
    pub source_line: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if self.source_line.is_empty() && self.column <= 1 {
            return Ok(());
        }
        write!(f, "\n{}\n", self.source_line)?;
        // Reuse the line's own tabs so the caret lines up whatever the tab width is.
        for c in self.source_line.chars().take(self.column.saturating_sub(1)) {
            f.write_str(if c == '\t' { "\t" } else { " " })?;
        }
        f.write_str("^")
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
