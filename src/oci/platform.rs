//! Target platforms for resolving an image index to one manifest.

use std::fmt;

use super::ParseError;

/// A platform to resolve an index to: `os` and `architecture` are required,
/// `variant` optional (none matches any variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// Which part of a [`Platform`] was rejected, so callers can name the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformField {
    /// `os`.
    Os,
    /// `architecture`.
    Architecture,
    /// `variant`.
    Variant,
}

impl Platform {
    /// Validates the parts of a platform. An empty `variant` means any.
    pub fn new(
        os: &str,
        architecture: &str,
        variant: &str,
    ) -> Result<Self, (PlatformField, ParseError)> {
        let part = |field, value: &str, required: bool| {
            if value.is_empty() {
                return if required {
                    Err((
                        field,
                        ParseError::new("is required when a platform is given", value),
                    ))
                } else {
                    Ok(())
                };
            }
            let ok = value.len() <= 64
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if ok {
                Ok(())
            } else {
                Err((
                    field,
                    ParseError::new("must be at most 64 letters, digits, '.', '_' or '-'", value),
                ))
            }
        };
        part(PlatformField::Os, os, true)?;
        part(PlatformField::Architecture, architecture, true)?;
        part(PlatformField::Variant, variant, false)?;
        Ok(Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: (!variant.is_empty()).then(|| variant.to_owned()),
        })
    }

    /// True when an index entry for `os`/`architecture`/`variant` serves this
    /// platform. An `arm64` entry without a variant counts as `v8`.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.architecture != architecture {
            return false;
        }
        let Some(wanted) = &self.variant else {
            return true;
        };
        let variant = match variant.filter(|v| !v.is_empty()) {
            Some(v) => v,
            None if architecture == "arm64" => "v8",
            None => return false,
        };
        wanted == variant
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_rules() {
        let any_arm = Platform::new("linux", "arm64", "").unwrap();
        assert!(any_arm.matches("linux", "arm64", None));
        assert!(any_arm.matches("linux", "arm64", Some("v8")));
        assert!(!any_arm.matches("linux", "amd64", None));
        assert!(!any_arm.matches("windows", "arm64", None));

        let v8 = Platform::new("linux", "arm64", "v8").unwrap();
        assert!(
            v8.matches("linux", "arm64", None),
            "arm64 without variant is v8"
        );
        assert!(v8.matches("linux", "arm64", Some("v8")));
        assert!(!v8.matches("linux", "arm64", Some("v9")));

        let v7 = Platform::new("linux", "arm", "v7").unwrap();
        assert!(!v7.matches("linux", "arm", None));
        assert!(v7.matches("linux", "arm", Some("v7")));
        assert!(!v7.matches("linux", "arm", Some("v6")));
    }

    #[test]
    fn validation_names_the_part() {
        assert_eq!(
            Platform::new("", "amd64", "").unwrap_err().0,
            PlatformField::Os
        );
        assert_eq!(
            Platform::new("linux", "", "").unwrap_err().0,
            PlatformField::Architecture
        );
        assert_eq!(
            Platform::new("linux", "arm", "v7\n").unwrap_err().0,
            PlatformField::Variant
        );
        assert_eq!(
            Platform::new("linux", "arm", "v7").unwrap().to_string(),
            "linux/arm/v7"
        );
    }
}
