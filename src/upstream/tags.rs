//! Tag listing. Upstreams differ (some ignore `n`/`last`, some do not sort),
//! so the engine reads the whole list, following same-origin `Link` pages,
//! sorts it, and pages it itself: walking with `next_last` visits every tag
//! exactly once, in lexical order.
//!
//! A hostile upstream cannot make the read endless or unbounded: the whole
//! list (every page) is capped in tags (`max_tags`) and in bytes
//! ([`TAG_BYTES_PER_TAG`] per allowed tag), paging stops at a `Link` to a
//! page already read, and every tag must match the tag grammar.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;

use super::client::Upstream;
use super::distribution::{fault_from_response, next_link, tags_request};
use super::failover::try_in_order;
use super::http::{ReadError, read_limited};
use super::routing::Route;
use super::{Engine, Error, Fault, Source};
use crate::cache::NegativeKey;
use crate::oci::{Repository, Tag};

/// Most bytes read for one page of a tag list.
const TAG_PAGE_LIMIT: usize = 16 * 1024 * 1024;

/// Bytes of tag list allowed per tag of `max_tags`, over all pages: a tag
/// is at most 128 characters, and its JSON (quotes, comma, whitespace) and
/// each page's envelope fit twice over.
pub(crate) const TAG_BYTES_PER_TAG: usize = 256;

/// Tag-list bytes allowed however small `max_tags` is (one envelope).
const TAG_BYTES_FLOOR: usize = 64 * 1024;

/// Most bytes read for a whole tag list when at most `max_tags` tags are.
fn tag_list_limit(max_tags: usize) -> usize {
    max_tags
        .saturating_mul(TAG_BYTES_PER_TAG)
        .saturating_add(TAG_BYTES_FLOOR)
}

/// A request for a page of tags.
#[derive(Debug, Clone)]
pub struct TagsRequest {
    /// The repository, as the caller named it.
    pub repository: Repository,
    /// Page size; `None` means all.
    pub n: Option<usize>,
    /// Only tags lexically after this one.
    pub last: Option<Tag>,
    /// Which upstreams to ask.
    pub route: Route,
}

/// A page of tags.
#[derive(Debug, Clone)]
pub struct TagPage {
    /// Tags in lexical order.
    pub tags: Vec<String>,
    /// The `last` for the next page; `None` when no tags remain.
    pub next_last: Option<String>,
    /// Where the list came from.
    pub source: Source,
}

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl Engine {
    /// Lists a page of tags.
    pub async fn fetch_tags(&self, req: TagsRequest) -> Result<TagPage, Error> {
        let repository = &req.repository;
        let candidates = self.router.candidates(repository, &req.route)?;
        let key = NegativeKey::Tags(repository.clone());
        let (upstream, mut tags) =
            try_in_order(&self.cache, &candidates, &key, |upstream| async move {
                self.list_tags(&upstream, repository).await
            })
            .await?;
        tags.sort_unstable();
        tags.dedup();
        Ok(page(
            tags,
            req.last.as_ref().map(Tag::as_str),
            req.n,
            Source::fetched(&upstream),
        ))
    }

    async fn list_tags(
        &self,
        upstream: &Arc<Upstream>,
        repository: &Repository,
    ) -> Result<Vec<String>, Fault> {
        let max_bytes = tag_list_limit(self.limits.max_tags);
        let mut read_bytes = 0;
        let mut tags = Vec::new();
        let mut fetched = HashSet::new();
        let mut next = None;
        loop {
            let request = tags_request(upstream, repository, next.take());
            fetched.insert(request.url.clone());
            let response = upstream.send(&request).await?;
            if !response.status().is_success() {
                return Err(fault_from_response(upstream, &request.what, response).await);
            }
            let link = next_link(response.headers(), &request.url).map_err(|e| {
                Fault::unavailable(format!(
                    "upstream `{}` listing {}: {e}",
                    upstream.name(),
                    request.what
                ))
            })?;
            let left = max_bytes - read_bytes;
            let body = match read_limited(response, left.min(TAG_PAGE_LIMIT)).await {
                Err(ReadError::TooLarge(_)) if left <= TAG_PAGE_LIMIT => {
                    return Err(Fault::unavailable(format!(
                        "upstream `{}` sent more than {max_bytes} bytes over {} pages of {} \
                         (the cap is {TAG_BYTES_PER_TAG} bytes per tag of max_tags, {})",
                        upstream.name(),
                        fetched.len(),
                        request.what,
                        self.limits.max_tags
                    )));
                }
                read => read.map_err(|e| upstream.read_fault(&request.what, e))?,
            };
            read_bytes += body.len();
            let list: TagList = serde_json::from_slice(&body).map_err(|e| {
                Fault::unavailable(format!(
                    "upstream `{}` sent an unusable tag list for {}: {e}",
                    upstream.name(),
                    request.what
                ))
            })?;
            let page = list.tags.unwrap_or_default();
            if let Some(Err(e)) = page.iter().map(|t| Tag::parse(t)).find(Result::is_err) {
                return Err(Fault::unavailable(format!(
                    "upstream `{}` sent an invalid tag in {}: {e}",
                    upstream.name(),
                    request.what
                )));
            }
            let empty_page = page.is_empty();
            tags.extend(page);
            if tags.len() > self.limits.max_tags {
                return Err(Fault::unavailable(format!(
                    "upstream `{}` lists more than {} tags for {} (max_tags)",
                    upstream.name(),
                    self.limits.max_tags,
                    request.what
                )));
            }
            match link {
                // A page without tags that points onward, or a link back to
                // a page already read, would loop forever.
                Some(url) if !empty_page && !fetched.contains(&url) => next = Some(url),
                Some(url) if !empty_page => {
                    tracing::debug!(upstream = upstream.name(), link = %url.path(), "tag list Link points to a page already read; stopping");
                    return Ok(tags);
                }
                _ => return Ok(tags),
            }
        }
    }
}

/// Cuts the page after `last` of at most `n` tags from a sorted list.
fn page(sorted: Vec<String>, last: Option<&str>, n: Option<usize>, source: Source) -> TagPage {
    let start = last.map_or(0, |last| sorted.partition_point(|t| t.as_str() <= last));
    let mut rest = sorted;
    rest.drain(..start);
    let next_last = match n {
        Some(n) if rest.len() > n => {
            rest.truncate(n);
            rest.last().cloned()
        }
        _ => None,
    };
    TagPage {
        tags: rest,
        next_last,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> Source {
        Source {
            upstream: "a".into(),
            cache_hit: false,
        }
    }

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pages_visit_every_tag_once() {
        let all = tags(&["1", "2", "a", "b", "c"]);
        let mut seen = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let p = page(all.clone(), last.as_deref(), Some(2), src());
            seen.extend(p.tags.clone());
            match p.next_last {
                Some(l) => last = Some(l),
                None => break,
            }
        }
        assert_eq!(seen, all);
    }

    #[test]
    fn edges() {
        let all = tags(&["a", "b", "c"]);
        assert_eq!(page(all.clone(), None, None, src()).tags, all);
        assert_eq!(page(all.clone(), None, Some(3), src()).next_last, None);
        assert_eq!(page(all.clone(), Some("b"), None, src()).tags, ["c"]);
        assert_eq!(page(all.clone(), Some("bb"), None, src()).tags, ["c"]);
        assert!(page(all.clone(), Some("z"), Some(1), src()).tags.is_empty());
        let p = page(all, None, Some(2), src());
        assert_eq!(
            (p.tags, p.next_last.as_deref()),
            (tags(&["a", "b"]), Some("b"))
        );
    }
}
