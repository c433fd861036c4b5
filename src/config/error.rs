//! Configuration errors: every one names the file, the line and the field, and says how to fix it.

use std::fmt;
use std::path::PathBuf;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read the configuration file: {source}\n  help: pass an existing file with -c FILE or set KAPROXY_CONFIG", path.display())]
    Read {
        /// The file we tried to read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A value (or the absence of one) that is not allowed.
    #[error("{location}: {field}: {problem}\n  help: {hint}")]
    Invalid {
        /// File and line.
        location: Location,
        /// Dotted path of the field, e.g. `route "web".client.keepalive.idle`.
        field: String,
        /// What is wrong.
        problem: String,
        /// What is allowed instead.
        hint: String,
    },
}

/// Where in a file a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The configuration file (or a pseudo name such as `<command line>`).
    pub file: String,
    /// 1-based line number in the file.
    pub line: usize,
    /// The environment variable the value came from, when it did not come from the file.
    pub env: Option<Box<str>>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.env {
            Some(var) => write!(f, "environment variable {var} (overriding {})", self.file),
            None => write!(f, "{}:{}", self.file, self.line),
        }
    }
}

impl ConfigError {
    /// The line an `Invalid` error points at, for tests and tooling.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { location, .. } => Some(location.line),
            ConfigError::Read { .. } => None,
        }
    }
}
