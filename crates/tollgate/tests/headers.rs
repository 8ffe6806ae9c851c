//! Every rate-limit header the layer writes, read back by an RFC 9651 structured-field parser
//! (`sfv`, as a client library would parse them), for every algorithm, several quotas and
//! policy names that need escaping, allowed and refused: each item must parse, and say what
//! the decision says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sfv::{BareItem, ListEntry, Parser};
use tollgate::clock::ManualClock;
use tollgate::{
    Decision, MemoryStore, Policy, Quota, QuotaState, RateLimitHeaders, RateLimitLayer,
};
use tower::{ServiceBuilder, ServiceExt};

/// One item of a parsed List: its string value and its integer parameters, in order.
#[derive(Debug)]
struct Entry {
    name: String,
    params: Vec<(String, i64)>,
}

impl Entry {
    fn get(&self, key: &str) -> Option<i64> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// Parses a header as an sf-list of string items with integer parameters; anything else
/// fails the test.
fn parse(field: &str, value: &str) -> Vec<Entry> {
    let list: sfv::List = Parser::new(value)
        .parse()
        .unwrap_or_else(|e| panic!("{field}: {value:?} is not an sf-list: {e}"));
    list.into_iter()
        .map(|entry| {
            let ListEntry::Item(item) = entry else {
                panic!("{field}: {value:?} holds an inner list");
            };
            let BareItem::String(name) = &item.bare_item else {
                panic!("{field}: {value:?}: an item that is not an sf-string");
            };
            let params = item
                .params
                .iter()
                .map(|(k, v)| {
                    let n = v
                        .as_integer()
                        .unwrap_or_else(|| panic!("{field}: {value:?}: {k:?} not an integer"));
                    (k.as_str().to_owned(), i64::from(n))
                })
                .collect();
            Entry {
                name: name.as_str().to_owned(),
                params,
            }
        })
        .collect()
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap()
}

/// What `t` must say for a quota's state: the wait for the request if it refused, else the
/// wait for one more unit.
fn expected_t(state: &QuotaState) -> i64 {
    if state.is_allowed() {
        ceil_secs(state.next_unit_after())
    } else {
        ceil_secs(state.retry_after()).max(1)
    }
}

/// The sf-string the layer names an item by: printable ASCII kept, anything else `_`.
fn item_name(policy: &str, quotas: usize, i: usize) -> String {
    let name = if quotas == 1 {
        policy.to_owned()
    } else {
        format!("{policy}-{}", i + 1)
    };
    name.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '_' })
        .collect()
}

fn check(policy: &str, quotas: &[Quota], res: &Response<Full<Bytes>>) {
    let decision = res
        .extensions()
        .get::<Decision>()
        .expect("the test's handler and 429 put the decision in the response");
    let headers = res.headers();
    let value = |name: &str| headers[name].to_str().unwrap().to_owned();

    let advertised = parse("RateLimit-Policy", &value("ratelimit-policy"));
    assert_eq!(advertised.len(), quotas.len(), "{advertised:?}");
    for (i, (item, quota)) in advertised.iter().zip(quotas).enumerate() {
        assert_eq!(item.name, item_name(policy, quotas.len(), i));
        assert_eq!(item.get("q"), Some(i64::from(quota.burst())), "{item:?}");
        // w: whole seconds, at least 1, never shorter than the burst takes at the nominal rate.
        let w = item.get("w").expect("w");
        assert!(w >= 1, "{item:?}");
        let span =
            quota.period().as_secs_f64() * f64::from(quota.burst()) / f64::from(quota.limit());
        assert!(
            w as f64 >= span - 1e-9 && (w as f64) < span + 1.0,
            "{item:?} for {span} s"
        );
    }

    let items = parse("RateLimit", &value("ratelimit"));
    assert_eq!(items.len(), quotas.len(), "{items:?}");
    for (i, (item, state)) in items.iter().zip(decision.states()).enumerate() {
        assert_eq!(item.name, item_name(policy, quotas.len(), i));
        assert_eq!(
            item.get("r"),
            Some(i64::from(state.remaining())),
            "{item:?} {state:?}"
        );
        assert_eq!(item.get("t"), Some(expected_t(state)), "{item:?} {state:?}");
        assert!(item.get("r").unwrap() <= i64::from(state.quota().burst()));
    }

    if res.status() == StatusCode::TOO_MANY_REQUESTS {
        let retry: i64 = value("retry-after")
            .parse()
            .expect("Retry-After is an integer");
        assert_eq!(retry, ceil_secs(decision.retry_after().unwrap()).max(1));
        // An item with nothing left is one a client waits on: none says longer than
        // Retry-After, and the binding one says exactly that. (An item with units left says
        // when it gets more, which nobody has to wait for.)
        let empty: Vec<i64> = items
            .iter()
            .filter(|i| i.get("r") == Some(0))
            .map(|i| i.get("t").unwrap())
            .collect();
        assert!(empty.iter().all(|t| *t <= retry), "{items:?} vs {retry}");
        assert!(empty.contains(&retry), "{items:?} vs {retry}");
    }
    let limit: u32 = value("x-ratelimit-limit").parse().unwrap();
    let remaining: u32 = value("x-ratelimit-remaining").parse().unwrap();
    let binding = decision.binding().unwrap();
    assert_eq!(
        (limit, remaining),
        (binding.quota().burst(), binding.remaining())
    );
    assert!(remaining <= limit);
}

async fn run(policy: &str, quotas: &[&str], steps_ms: &[u64]) {
    let quotas: Vec<Quota> = quotas.iter().map(|q| q.parse().unwrap()).collect();
    let clock = ManualClock::new();
    let mut p = Policy::new(policy, quotas[0]);
    for q in &quotas[1..] {
        p = p.add_quota(*q);
    }
    let layer = RateLimitLayer::new(MemoryStore::with_clock(clock.clone()))
        .policy(p)
        .headers(RateLimitHeaders::Both)
        .decision_extension(true)
        .limited_response(|d| {
            let mut res = Response::new(Bytes::from_static(b"limited"));
            *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            res.extensions_mut().insert(d.clone());
            res
        });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|req: Request<()>| async move {
            let mut res = Response::new(Full::<Bytes>::default());
            if let Some(d) = req.extensions().get::<Decision>() {
                res.extensions_mut().insert(d.clone());
            }
            Ok::<_, Infallible>(res)
        });
    let mut refused = 0;
    for &gap in steps_ms {
        clock.advance(Duration::from_millis(gap));
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(SocketAddr::from(([192, 0, 2, 1], 4000)));
        let res = svc.clone().oneshot(req).await.unwrap();
        refused += usize::from(res.status() == StatusCode::TOO_MANY_REQUESTS);
        check(policy, &quotas, &res);
    }
    assert!(
        refused > 0,
        "{policy}: the sequence never reached the limit"
    );
}

/// Bursts, then pauses of odd lengths: allowed and refused answers, partly replenished states.
const STEPS: &[u64] = &[
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 250, 0, 0, 1_333, 0, 0, 4_999, 0, 7, 0,
];

#[tokio::test]
async fn every_algorithm() {
    run("gcra", &["5/10s"], STEPS).await;
    run("gcra-burst", &["2/s burst 4"], STEPS).await;
    run("gcra-odd", &["10/1400ms"], STEPS).await;
    run("fixed", &["3/5s fixed-window"], STEPS).await;
    run("sliding", &["4/3s sliding-window"], STEPS).await;
}

#[tokio::test]
async fn several_quotas() {
    run("export", &["2/s", "5/m"], STEPS).await;
    run(
        "mixed",
        &["3/s burst 6", "8/10s fixed-window", "10/m sliding-window"],
        STEPS,
    )
    .await;
}

/// Policy names are checked to be 1 to 64 letters, digits, `-` or `_` (so nothing a client
/// sends can need escaping); the edges of that still parse as sf-strings.
#[tokio::test]
async fn names_at_the_edges_of_what_is_allowed() {
    run(&"x".repeat(64), &["3/s"], STEPS).await;
    run("0", &["3/s", "9/m"], STEPS).await;
    run("-_-", &["3/s"], STEPS).await;
    run("UPPER_lower-123", &["3/s", "9/m"], STEPS).await;
    // The longest names over several quotas: a `RateLimit` value longer than the stack buffer
    // the layer writes short ones in.
    run(&"y".repeat(64), &["3/s", "9/m", "20/h", "100/d"], STEPS).await;
}
