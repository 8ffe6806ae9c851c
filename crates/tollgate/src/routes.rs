//! The table both layers use to find the policy of a request: by axum's matched route template
//! and method, else a default policy.

use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request};

/// Policies by route template, each for any method or for one method, and a default.
pub(crate) struct RouteTable<P> {
    // Matched against axum's `MatchedPath`; without axum only the default applies.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    routes: HashMap<String, Entry<P>>,
    default: Option<Arc<P>>,
}

struct Entry<P> {
    any: Option<Arc<P>>,
    by_method: Vec<(Method, Arc<P>)>,
}

impl<P> Entry<P> {
    /// The policy bound to this method. A `HEAD` request without a `HEAD` entry takes the
    /// `GET` entry: axum answers `HEAD` with the `GET` handler (dropping only the body), so a
    /// `GET` policy that did not cover `HEAD` could be stepped around with `curl -I`.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    fn for_method(&self, method: &Method) -> Option<&Arc<P>> {
        let find = |m: &Method| self.by_method.iter().find(|(e, _)| e == m).map(|(_, p)| p);
        find(method).or_else(|| {
            (*method == Method::HEAD)
                .then(|| find(&Method::GET))
                .flatten()
        })
    }
}

impl<P> RouteTable<P> {
    /// Builds the table from a layer's entries, compiling each policy with `compile`. The last
    /// entry for the same route and method wins, as with a router.
    pub(crate) fn build<S>(
        entries: &[(Option<Method>, String, S)],
        default: Option<&S>,
        mut compile: impl FnMut(&S) -> Arc<P>,
    ) -> Self {
        let mut routes: HashMap<String, Entry<P>> = HashMap::new();
        for (method, template, policy) in entries {
            let entry = routes.entry(template.clone()).or_insert_with(|| Entry {
                any: None,
                by_method: Vec::new(),
            });
            let compiled = compile(policy);
            match method {
                None => entry.any = Some(compiled),
                Some(m) => {
                    entry.by_method.retain(|(existing, _)| existing != m);
                    entry.by_method.push((m.clone(), compiled));
                }
            }
        }
        RouteTable {
            routes,
            default: default.map(compile),
        }
    }

    /// The policy of `req` and its matched route template, if any policy applies. A
    /// method-specific entry wins over one for any method (`HEAD` falls back to `GET`'s); a
    /// matched route without an entry falls back to the default.
    /// The policy is borrowed from the table, the template from the request.
    pub(crate) fn lookup<'p: 'r, 'r, B>(
        &'p self,
        req: &'r Request<B>,
    ) -> Option<(&'p Arc<P>, Option<&'r str>)> {
        #[cfg(feature = "axum")]
        if let Some(matched) = req.extensions().get::<axum::extract::MatchedPath>() {
            let matched = matched.as_str();
            if let Some(entry) = self.routes.get(matched) {
                let by_method = entry.for_method(req.method());
                if let Some(policy) = by_method.or(entry.any.as_ref()) {
                    return Some((policy, Some(matched)));
                }
            }
            return self.default.as_ref().map(|p| (p, Some(matched)));
        }
        #[cfg(not(feature = "axum"))]
        let _ = req;
        self.default.as_ref().map(|p| (p, None))
    }
}
