//! The MCP tool-name rules (2025-11-25 "Tool Names"): 1 to 128 characters from
//! `A-Z a-z 0-9 _ - .`.

use thiserror::Error;

/// Longest tool name the specification allows.
pub const MAX_TOOL_NAME_LEN: usize = 128;

/// Why a tool name breaks the MCP naming rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ToolNameError {
    /// The name is empty.
    #[error("tool name is empty; names must be 1 to 128 characters")]
    Empty,
    /// The name is longer than 128 characters.
    #[error("tool name `{name}` is {len} characters long; the limit is 128")]
    TooLong {
        /// The offending name.
        name: String,
        /// Its length in characters.
        len: usize,
    },
    /// The name contains a character outside `A-Z a-z 0-9 _ - .`.
    #[error(
        "tool name `{name}` contains {ch:?} at position {position}; allowed are A-Z, a-z, 0-9, `_`, `-` and `.`"
    )]
    BadCharacter {
        /// The offending name.
        name: String,
        /// The first character that is not allowed.
        ch: char,
        /// Its character index.
        position: usize,
    },
}

/// Checks `name` against the MCP tool-name rules.
pub fn validate_tool_name(name: &str) -> Result<(), ToolNameError> {
    if name.is_empty() {
        return Err(ToolNameError::Empty);
    }
    if let Some((position, ch)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(ToolNameError::BadCharacter {
            name: name.to_owned(),
            ch,
            position,
        });
    }
    let len = name.len();
    if len > MAX_TOOL_NAME_LEN {
        return Err(ToolNameError::TooLong {
            name: name.to_owned(),
            len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spec_examples_are_valid() {
        for n in ["getUser", "DATA_EXPORT_v2", "admin.tools.list", "a__b-c"] {
            assert_eq!(validate_tool_name(n), Ok(()));
        }
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        assert_eq!(validate_tool_name(""), Err(ToolNameError::Empty));
        let err = validate_tool_name("get user").unwrap_err();
        assert!(err.to_string().contains("' '"), "{err}");
        assert!(err.to_string().contains("position 3"), "{err}");
        let long = "x".repeat(129);
        assert!(matches!(
            validate_tool_name(&long),
            Err(ToolNameError::TooLong { len: 129, .. })
        ));
        assert!(validate_tool_name(&"x".repeat(128)).is_ok());
    }

    proptest! {
        #[test]
        fn valid_iff_charset_and_length(s in "\\PC{0,140}") {
            let ok = !s.is_empty()
                && s.len() <= 128
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            prop_assert_eq!(validate_tool_name(&s).is_ok(), ok);
        }
    }
}
