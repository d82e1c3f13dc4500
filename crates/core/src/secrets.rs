//! Secret references in upstream `headers` and `env` values: `${env:NAME}`
//! (a variable of the gateway's own environment) and `${file:/path}` (a
//! file's content without its trailing newline), resolved when the gateway
//! connects, so secrets stay out of the configuration file and the store.
//! `$${` stands for a literal `${`; every other `$` is literal.
//!
//! Pure: the lookups are closures the caller passes in (the server reads
//! the process environment and the filesystem), so every rule is
//! unit-tested without touching either.

use std::fmt;

/// One reference in a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `${env:NAME}`: the gateway's environment variable `NAME`.
    Env(String),
    /// `${file:/path}`: the content of the file at `/path`.
    File(String),
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "${{env:{name}}}"),
            SecretRef::File(path) => write!(f, "${{file:{path}}}"),
        }
    }
}

/// Why a value's references are malformed (found by configuration checks).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    /// `${` without a closing `}`.
    #[error(
        "`${{` (byte {at} of the value) has no closing `}}`; write `${{env:NAME}}` or `${{file:/path}}`, or `$${{` for a literal `${{`"
    )]
    Unclosed {
        /// Byte offset of the `$`.
        at: usize,
    },
    /// `${kind:...}` with a kind other than `env` or `file`.
    #[error(
        "`${{{kind}:...}}` is not a known reference: use `${{env:NAME}}` or `${{file:/path}}`, or `$${{` for a literal `${{`"
    )]
    UnknownKind {
        /// What stood before the colon.
        kind: String,
    },
    /// `${env:}` with a name that is not a variable name.
    #[error(
        "`${{env:{name}}}` does not name an environment variable: use letters, digits and `_`, not starting with a digit"
    )]
    BadName {
        /// The name as written.
        name: String,
    },
    /// `${file:...}` with a path that is not absolute.
    #[error(
        "`${{file:{path}}}` needs an absolute path (starting with `/`), since the gateway's working directory is not the configuration file's"
    )]
    RelativePath {
        /// The path as written.
        path: String,
    },
}

/// Why a value could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The value is malformed.
    #[error("{0}")]
    Syntax(#[from] SyntaxError),
    /// A referenced variable or file is not available.
    #[error("`{reference}` cannot be resolved: {why}")]
    Unavailable {
        /// The reference.
        reference: SecretRef,
        /// Why (from the lookup; never the value).
        why: String,
    },
}

/// A piece of a parsed value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Literal(&'a str),
    Ref(SecretRef),
}

fn parse(value: &str) -> Result<Vec<Piece<'_>>, SyntaxError> {
    let mut pieces = Vec::new();
    let mut rest = value;
    let mut offset = 0;
    while let Some(at) = rest.find("${") {
        // `$${` is an escaped `${`: everything up to and including the
        // first `$` is literal, the `${` after it too.
        if at > 0 && rest.as_bytes()[at - 1] == b'$' {
            pieces.push(Piece::Literal(&rest[..at - 1]));
            pieces.push(Piece::Literal("${"));
            rest = &rest[at + 2..];
            offset += at + 2;
            continue;
        }
        pieces.push(Piece::Literal(&rest[..at]));
        let body = &rest[at + 2..];
        let close = body
            .find('}')
            .ok_or(SyntaxError::Unclosed { at: offset + at })?;
        let inner = &body[..close];
        let (kind, arg) = inner.split_once(':').unwrap_or((inner, ""));
        let reference = match kind {
            "env" => {
                let ok = arg
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && arg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    return Err(SyntaxError::BadName { name: arg.into() });
                }
                SecretRef::Env(arg.into())
            }
            "file" => {
                if !arg.starts_with('/') {
                    return Err(SyntaxError::RelativePath { path: arg.into() });
                }
                SecretRef::File(arg.into())
            }
            other => {
                return Err(SyntaxError::UnknownKind { kind: other.into() });
            }
        };
        pieces.push(Piece::Ref(reference));
        let consumed = at + 2 + close + 1;
        rest = &rest[consumed..];
        offset += consumed;
    }
    pieces.push(Piece::Literal(rest));
    Ok(pieces)
}

/// The references in `value`, in order (empty for a plain value).
pub fn references(value: &str) -> Result<Vec<SecretRef>, SyntaxError> {
    Ok(parse(value)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Ref(r) => Some(r),
            Piece::Literal(_) => None,
        })
        .collect())
}

/// Whether `value` refers to the gateway's environment or files (a
/// malformed value counts as not referring: the configuration check
/// refuses it anyway).
pub fn has_references(value: &str) -> bool {
    references(value).is_ok_and(|r| !r.is_empty())
}

/// `value` with every reference replaced: `env` looks a variable up,
/// `file` reads a file (its trailing newline is dropped); each returns why
/// it could not, and that reason must not contain the value.
pub fn resolve(
    value: &str,
    env: impl Fn(&str) -> Result<String, String>,
    file: impl Fn(&str) -> Result<String, String>,
) -> Result<String, ResolveError> {
    let mut out = String::with_capacity(value.len());
    for piece in parse(value)? {
        match piece {
            Piece::Literal(s) => out.push_str(s),
            Piece::Ref(r) => {
                let found = match &r {
                    SecretRef::Env(name) => env(name),
                    SecretRef::File(path) => {
                        file(path).map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                    }
                };
                match found {
                    Ok(v) => out.push_str(&v),
                    Err(why) => {
                        return Err(ResolveError::Unavailable { reference: r, why });
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Result<String, String> {
        match name {
            "TOKEN" => Ok("s3cret".into()),
            "EMPTY" => Ok(String::new()),
            _ => Err(format!("the gateway has no environment variable {name}")),
        }
    }

    fn file(path: &str) -> Result<String, String> {
        match path {
            "/run/secrets/key" => Ok("from-file\n".into()),
            "/run/secrets/crlf" => Ok("windows\r\n".into()),
            _ => Err(format!("cannot read {path}: No such file or directory")),
        }
    }

    fn r(value: &str) -> Result<String, ResolveError> {
        resolve(value, env, file)
    }

    #[test]
    fn plain_values_are_unchanged() {
        for v in [
            "",
            "Bearer abc",
            "$HOME",
            "cost $5",
            "a$$b",
            "{}",
            "$ {env:X}",
        ] {
            assert_eq!(r(v).as_deref(), Ok(v), "{v}");
            assert!(!has_references(v), "{v}");
        }
    }

    #[test]
    fn env_and_file_references_are_replaced_in_place() {
        assert_eq!(r("Bearer ${env:TOKEN}").as_deref(), Ok("Bearer s3cret"));
        assert_eq!(r("${file:/run/secrets/key}").as_deref(), Ok("from-file"));
        assert_eq!(r("${file:/run/secrets/crlf}").as_deref(), Ok("windows"));
        assert_eq!(
            r("${env:TOKEN}:${file:/run/secrets/key}!").as_deref(),
            Ok("s3cret:from-file!")
        );
        assert_eq!(r("x${env:EMPTY}y").as_deref(), Ok("xy"));
        assert!(has_references("Bearer ${env:TOKEN}"));
    }

    #[test]
    fn a_doubled_dollar_escapes_a_literal_reference() {
        assert_eq!(r("$${env:TOKEN}").as_deref(), Ok("${env:TOKEN}"));
        assert_eq!(r("a$${b}c").as_deref(), Ok("a${b}c"));
        assert_eq!(r("$$${env:TOKEN}").as_deref(), Ok("$${env:TOKEN}"));
        assert!(!has_references("$${env:TOKEN}"));
        // An escape followed by a real reference.
        assert_eq!(r("$${x} ${env:TOKEN}").as_deref(), Ok("${x} s3cret"));
    }

    #[test]
    fn a_missing_variable_or_file_names_the_reference_not_a_value() {
        let e = r("Bearer ${env:NOPE}").expect_err("NOPE is not set");
        assert_eq!(
            e,
            ResolveError::Unavailable {
                reference: SecretRef::Env("NOPE".into()),
                why: "the gateway has no environment variable NOPE".into(),
            }
        );
        let text = e.to_string();
        assert!(text.contains("${env:NOPE}"), "{text}");
        let e = r("${file:/nope}").expect_err("no such file");
        assert!(e.to_string().contains("${file:/nope}"), "{e}");
        // The first failure stops the resolution; a resolved value before
        // it does not leak into the error.
        let e = r("${env:TOKEN}${env:NOPE}").expect_err("NOPE is not set");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn malformed_references_are_syntax_errors() {
        assert_eq!(
            references("Bearer ${env:TOKEN"),
            Err(SyntaxError::Unclosed { at: 7 })
        );
        assert_eq!(
            references("${vault:x}"),
            Err(SyntaxError::UnknownKind {
                kind: "vault".into()
            })
        );
        assert_eq!(
            references("${TOKEN}"),
            Err(SyntaxError::UnknownKind {
                kind: "TOKEN".into()
            })
        );
        assert_eq!(
            references("${env:}"),
            Err(SyntaxError::BadName { name: "".into() })
        );
        assert_eq!(
            references("${env:1X}"),
            Err(SyntaxError::BadName { name: "1X".into() })
        );
        assert_eq!(
            references("${file:secrets/key}"),
            Err(SyntaxError::RelativePath {
                path: "secrets/key".into()
            })
        );
        assert!(matches!(r("${env:A-B}"), Err(ResolveError::Syntax(_))));
    }

    #[test]
    fn references_are_listed_in_order() {
        assert_eq!(
            references("${file:/a} and ${env:B}"),
            Ok(vec![
                SecretRef::File("/a".into()),
                SecretRef::Env("B".into())
            ])
        );
        assert_eq!(SecretRef::Env("B".into()).to_string(), "${env:B}");
        assert_eq!(SecretRef::File("/a".into()).to_string(), "${file:/a}");
    }

    #[test]
    fn the_unclosed_offset_counts_from_the_start_of_the_value() {
        assert_eq!(
            references("${env:A} x ${env:B"),
            Err(SyntaxError::Unclosed { at: 11 })
        );
    }
}
