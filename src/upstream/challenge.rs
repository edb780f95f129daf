//! `WWW-Authenticate` challenges: the parser that drives the token flow.

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lowercased (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters with lowercased names.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// A parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses every challenge in a `WWW-Authenticate` value: several challenges
/// in one header, quoted values containing commas and escapes, any case of
/// scheme and parameter names. Unparseable pieces are skipped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut p = Cursor {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip(|b| b == b',' || b.is_ascii_whitespace());
        if p.done() {
            break;
        }
        let Some(scheme) = p.token() else {
            p.i += 1;
            continue;
        };
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        loop {
            p.skip(|b| b.is_ascii_whitespace());
            let start = p.i;
            let Some(name) = p.token() else { break };
            p.skip(|b| b.is_ascii_whitespace());
            if !p.eat(b'=') {
                // A token68 or the next challenge's scheme.
                p.i = start;
                break;
            }
            p.skip(|b| b.is_ascii_whitespace());
            let value = if p.peek() == Some(b'"') {
                p.quoted()
            } else {
                p.token().unwrap_or_default()
            };
            challenge.params.push((name.to_ascii_lowercase(), value));
            p.skip(|b| b.is_ascii_whitespace());
            if !p.eat(b',') {
                break;
            }
        }
        if challenge.params.is_empty() {
            // Skip a token68 (e.g. `Negotiate abc==`) so it is not read as a scheme.
            p.skip(|b| b != b',');
        }
        out.push(challenge);
    }
    out
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn skip(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
    }
    fn token(&mut self) -> Option<String> {
        let start = self.i;
        self.skip(|b| !(b.is_ascii_whitespace() || matches!(b, b',' | b'=' | b'"')));
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn quoted(&mut self) -> String {
        self.i += 1; // opening quote
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(next) = self.peek() {
                        out.push(next);
                        self.i += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_distribution_bearer_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/nginx:pull"));
    }

    #[test]
    fn several_challenges_quoted_commas_and_case() {
        let c = parse_challenges(
            r#"Basic realm="Registry, with comma", BEARER Realm="https://t/x",Scope="repository:a:pull,push", error="invalid_token""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry, with comma"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("https://t/x"));
        assert_eq!(c[1].param("scope"), Some("repository:a:pull,push"));
        assert_eq!(c[1].param("error"), Some("invalid_token"));
    }

    #[test]
    fn missing_scope_unquoted_values_escapes_and_token68() {
        let c = parse_challenges(r#"Bearer realm=https://t/token, service=reg"#);
        assert_eq!(c[0].param("realm"), Some("https://t/token"));
        assert_eq!(c[0].param("service"), Some("reg"));
        assert_eq!(c[0].param("scope"), None);
        let c = parse_challenges(r#"Basic realm="a \"b\"""#);
        assert_eq!(c[0].param("realm"), Some(r#"a "b""#));
        let c = parse_challenges("Negotiate abc==, Basic realm=x");
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].scheme, "basic");
        assert!(parse_challenges("").is_empty());
        assert!(parse_challenges(" , ").is_empty());
    }
}
