//! Parser for cloud-hypervisor style option values: `key=value,key=value`,
//! where a value may be quoted (`"a,b"`) or bracketed (`[1,2]`) to carry commas.

use std::collections::BTreeMap;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("unknown key '{key}' (expected one of: {expected})")]
    UnknownKey { key: String, expected: String },
    #[error("key '{0}' is given twice")]
    DuplicateKey(String),
    #[error("'{0}' is not of the form key=value")]
    MissingValue(String),
    #[error("unbalanced quote or bracket in '{0}'")]
    Unbalanced(String),
    #[error("invalid value '{value}' for '{key}': expected {expected}")]
    InvalidValue {
        key: String,
        value: String,
        expected: &'static str,
    },
}

/// The `key=value` pairs of one option, checked against the keys it accepts.
#[derive(Debug, Default)]
pub struct OptionValues {
    values: BTreeMap<String, String>,
}

impl OptionValues {
    /// Splits `input` and rejects keys outside `known`.
    pub fn parse(input: &str, known: &[&str]) -> Result<Self, OptionError> {
        let mut values = BTreeMap::new();
        for item in split_items(input)? {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| OptionError::MissingValue(item.to_string()))?;
            if !known.contains(&key) {
                return Err(OptionError::UnknownKey {
                    key: key.to_string(),
                    expected: known.join(", "),
                });
            }
            if values
                .insert(key.to_string(), unquote(value).to_string())
                .is_some()
            {
                return Err(OptionError::DuplicateKey(key.to_string()));
            }
        }
        Ok(OptionValues { values })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Parses the value of `key` as an unsigned integer (decimal or 0x hex).
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.get(key)
            .map(|v| {
                parse_u64(v).ok_or_else(|| OptionError::InvalidValue {
                    key: key.to_string(),
                    value: v.to_string(),
                    expected: "an unsigned integer",
                })
            })
            .transpose()
    }

    /// Parses the value of `key` as a size with an optional K/M/G/T suffix.
    pub fn get_size(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.get(key)
            .map(|v| {
                parse_size(v).ok_or_else(|| OptionError::InvalidValue {
                    key: key.to_string(),
                    value: v.to_string(),
                    expected: "a size such as 512M, 2G or 1048576",
                })
            })
            .transpose()
    }
}

fn split_items(input: &str) -> Result<Vec<&str>, OptionError> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '[' if !quoted => depth += 1,
            ']' if !quoted => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| OptionError::Unbalanced(input.to_string()))?
            }
            ',' if !quoted && depth == 0 => {
                items.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted || depth != 0 {
        return Err(OptionError::Unbalanced(input.to_string()));
    }
    items.push(&input[start..]);
    Ok(items.into_iter().filter(|s| !s.is_empty()).collect())
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

pub fn parse_u64(value: &str) -> Option<u64> {
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

/// `512M`, `2G`, `1024K`, `1T` or a plain byte count.
pub fn parse_size(value: &str) -> Option<u64> {
    let (digits, shift) = match value.chars().last()? {
        'K' | 'k' => (&value[..value.len() - 1], 10),
        'M' | 'm' => (&value[..value.len() - 1], 20),
        'G' | 'g' => (&value[..value.len() - 1], 30),
        'T' | 't' => (&value[..value.len() - 1], 40),
        _ => (value, 0),
    };
    let number: u64 = digits.parse().ok()?;
    number.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pairs_and_respects_quotes_and_brackets() {
        let v = OptionValues::parse(r#"a=1,b="x,y",c=[1,2]"#, &["a", "b", "c"]).unwrap();
        assert_eq!(v.get("a"), Some("1"));
        assert_eq!(v.get("b"), Some("x,y"));
        assert_eq!(v.get("c"), Some("[1,2]"));
    }

    #[test]
    fn rejects_unknown_duplicate_and_bare_keys() {
        assert!(matches!(
            OptionValues::parse("boot=1,bogus=2", &["boot"]),
            Err(OptionError::UnknownKey { .. })
        ));
        assert_eq!(
            OptionValues::parse("boot=1,boot=2", &["boot"]).unwrap_err(),
            OptionError::DuplicateKey("boot".into())
        );
        assert_eq!(
            OptionValues::parse("boot", &["boot"]).unwrap_err(),
            OptionError::MissingValue("boot".into())
        );
        assert!(OptionValues::parse("a=\"x", &["a"]).is_err());
        assert!(OptionValues::parse("a=]", &["a"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size("17179869184G"), None);
        assert_eq!(parse_u64("0x10"), Some(16));
    }
}
