//! The memory store's check against governor's keyed limiter, the layer's own overhead, and key
//! extraction. Run with `cargo bench -p tollgate --bench store`; see docs/benchmarks.md.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use governor::{DefaultKeyedRateLimiter, RateLimiter};
use http::{HeaderMap, Request, Response, StatusCode};
use tollgate::key::KeyPrefix;
use tollgate::{ClientIpSource, Key, MemoryStore, Policy, Quota, RateLimitLayer};
use tower::{ServiceBuilder, ServiceExt};

fn ips(n: usize) -> Vec<IpAddr> {
    // Distinct addresses in a scattered order.
    (0..n as u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761) ^ 0x0a00_0000)))
        .collect()
}

/// The burst of the allowed path's quotas. A million units a second is the fastest rate a
/// quota can have (its interval is whole microseconds), and a run on one key checks faster than
/// that (20 to 30 million a second), so with a burst of a second's worth the key ran dry within
/// the first second and most of the "allowed" checks were refusals (until ec46da5, 2026-12-07:
/// 35% of the layer's "allowed" requests were answered 429). Four billion units outlast every run: a
/// whole `cargo bench` spends a few hundred million on its hottest key.
const BURST: u32 = u32::MAX;

/// Never limits within a run: every check does the full work of an allowed request (the `check`
/// group asserts it after its rows, the `layer` group counts every answer).
fn tollgate_quota() -> Quota {
    Quota::per_second(1_000_000)
        .and_then(|q| q.with_burst(BURST))
        .unwrap()
}

fn governor_quota() -> governor::Quota {
    governor::Quota::per_second(NonZeroU32::new(1_000_000).unwrap())
        .allow_burst(NonZeroU32::new(BURST).unwrap())
}

/// A check keyed as the layer keys it: the policy and the route hashed once (`KeyPrefix`, what
/// the layer keeps for each route), the address per request.
fn tollgate_check(store: &MemoryStore, prefix: &KeyPrefix, quotas: &[Quota], ip: IpAddr) -> bool {
    decided(store, &prefix.key(Some(ip), None::<&str>), quotas)
}

/// The same check with the key made by `Key::new` from its strings, as a direct caller of the
/// store may make it.
fn tollgate_check_key_new(store: &MemoryStore, quotas: &[Quota], ip: IpAddr) -> bool {
    decided(
        store,
        &Key::new("hello", "/hello", Some(ip), None::<&str>),
        quotas,
    )
}

fn decided(store: &MemoryStore, key: &Key<'_>, quotas: &[Quota]) -> bool {
    store
        .decide(key, quotas, 1)
        .map(|d| d.is_allowed())
        .unwrap_or(false)
}

/// Runs `iters` checks spread over `threads` threads; returns the wall time.
fn threaded<F: Fn(usize) + Sync>(threads: usize, iters: u64, f: F) -> Duration {
    let per = (iters as usize).div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || {
                for i in 0..per {
                    f(t * 7_919 + i);
                }
            });
        }
    });
    start.elapsed()
}

fn check(c: &mut Criterion) {
    for (label, n) in [
        ("hot_key", 1usize),
        ("100k_keys", 100_000),
        ("1M_keys", 1_000_000),
    ] {
        let mut group = c.benchmark_group(format!("check/{label}"));
        group
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .sample_size(20);
        let ips = ips(n);
        let quotas = [tollgate_quota()];
        let store = MemoryStore::new();
        let prefix = KeyPrefix::new("hello", "/hello");
        // governor keyed by the address (as tower_governor's peer-IP extractor does), and by a
        // "<route>:<ip>" String built per request (a per-route key, as tollgate's).
        let gov_ip: DefaultKeyedRateLimiter<IpAddr> = RateLimiter::keyed(governor_quota());
        let gov_string: DefaultKeyedRateLimiter<String> = RateLimiter::keyed(governor_quota());
        // Fill every store with every key first, so the runs measure lookups in a full map.
        for ip in &ips {
            tollgate_check(&store, &prefix, &quotas, *ip);
            let _ = gov_ip.check_key(ip);
            let _ = gov_string.check_key(&format!("/hello:{ip}"));
        }
        for threads in [1usize, 2] {
            group.bench_function(BenchmarkId::new("tollgate", format!("{threads}t")), |b| {
                b.iter_custom(|iters| {
                    threaded(threads, iters, |i| {
                        black_box(tollgate_check(&store, &prefix, &quotas, ips[i % n]));
                    })
                });
            });
            group.bench_function(
                BenchmarkId::new("tollgate_key_new", format!("{threads}t")),
                |b| {
                    b.iter_custom(|iters| {
                        threaded(threads, iters, |i| {
                            black_box(tollgate_check_key_new(&store, &quotas, ips[i % n]));
                        })
                    });
                },
            );
            group.bench_function(
                BenchmarkId::new("governor_ip_key", format!("{threads}t")),
                |b| {
                    b.iter_custom(|iters| {
                        threaded(threads, iters, |i| {
                            black_box(gov_ip.check_key(&ips[i % n]).is_ok());
                        })
                    });
                },
            );
            group.bench_function(
                BenchmarkId::new("governor_string_key", format!("{threads}t")),
                |b| {
                    b.iter_custom(|iters| {
                        threaded(threads, iters, |i| {
                            let key = format!("/hello:{}", ips[i % n]);
                            black_box(gov_string.check_key(&key).is_ok());
                        })
                    });
                },
            );
        }
        group.finish();
        // No row came near the burst: what is left of it on the hottest key is still most of it
        // (governor's limiter has the same burst and runs no more checks on it).
        let left = store
            .decide(&prefix.key(Some(ips[0]), None::<&str>), &quotas, 1)
            .map(|d| d.remaining())
            .unwrap_or(0);
        assert!(left > BURST / 2, "{label}: only {left} of the burst left");
    }
}

/// Polls a future that is ready without waiting (every future here is).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the benchmarked services are ready at once"),
    }
}

/// Counts a row's answers that were not the one it measures, and fails the run when there were
/// any: an "allowed" row that was refused measured the wrong path. Every row counts alike, the
/// bare ones too, so the comparison between rows is unchanged.
struct Answers {
    expected: StatusCode,
    other: u64,
}

impl Answers {
    fn new(expected: StatusCode) -> Self {
        Answers { expected, other: 0 }
    }

    fn count<B>(&mut self, res: Result<Response<B>, Infallible>) -> StatusCode {
        let status = black_box(res).map_or(StatusCode::INTERNAL_SERVER_ERROR, |r| r.status());
        if status != self.expected {
            self.other += 1;
        }
        status
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        assert_eq!(
            self.other, 0,
            "{} answers were not {}: the row measured another path",
            self.other, self.expected
        );
    }
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// One row of the `layer` group: `svc` cloned and called per iteration (as axum calls a
/// service), every answer counted against `expected` ([`Answers`]).
fn row<S, B>(
    group: &mut Group<'_>,
    name: &str,
    expected: StatusCode,
    svc: &S,
    request: &impl Fn() -> Request<()>,
) where
    S: tower::Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
{
    group.bench_function(name, |b| {
        let mut answers = Answers::new(expected);
        b.iter(|| answers.count(now(svc.clone().oneshot(request()))));
    });
}

// Statics, as the layer's own names are: built when compiled, not checked per request.
static RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
static RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

fn layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("layer");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    // The peer address as axum's `into_make_service_with_connect_info` gives it (the README's
    // setup), so the layer finds it with its first lookup.
    let request = || {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(SocketAddr::from((
                [192, 0, 2, 1],
                4000,
            ))));
        req
    };
    let handler = |_req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(http_body_util::Full::<
            bytes::Bytes,
        >::default())))
    };
    let bare = ServiceBuilder::new().service_fn(handler);
    row(&mut group, "no_limiter", StatusCode::OK, &bare, &request);
    // No limiter, but the handler's response carries the two header fields the layer adds,
    // with values of the same length: what adding them costs in http itself (the response's
    // map allocates its tables on its first insert, each value its bytes), whoever computes
    // them. The part of the layer's headers no limiter can avoid.
    let policy = http::HeaderValue::try_from(String::from("\"api\";q=1000000;w=1")).unwrap();
    // Borrowed, so that the service is copied per request as the bare one is.
    let policy = &policy;
    let with_fields = ServiceBuilder::new().service_fn(move |_req: Request<()>| {
        let mut res = Response::new(http_body_util::Full::<bytes::Bytes>::default());
        let value = http::HeaderValue::from_bytes(black_box(b"\"api\";r=999999;t=0")).unwrap();
        let headers = res.headers_mut();
        headers.append(RATELIMIT_POLICY.clone(), policy.clone());
        headers.append(RATELIMIT.clone(), value);
        std::future::ready(Ok::<_, Infallible>(res))
    });
    let name = "no_limiter_two_header_fields";
    row(&mut group, name, StatusCode::OK, &with_fields, &request);
    for (label, quota, status) in [
        ("allowed", tollgate_quota(), StatusCode::OK),
        (
            "limited",
            Quota::per_hour(1).unwrap(),
            StatusCode::TOO_MANY_REQUESTS,
        ),
    ] {
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(MemoryStore::new()).policy(Policy::new("api", quota)))
            .service_fn(handler);
        // The one request a limited key lets through, spent before the run.
        let _ = now(svc.clone().oneshot(request()));
        row(
            &mut group,
            &format!("tollgate_{label}"),
            status,
            &svc,
            &request,
        );
    }
    // The same allowed path without rate-limit headers: what formatting them costs.
    let quiet = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .policy(Policy::new("api", tollgate_quota()))
                .headers(tollgate::RateLimitHeaders::None),
        )
        .service_fn(handler);
    let name = "tollgate_allowed_no_headers";
    row(&mut group, name, StatusCode::OK, &quiet, &request);
    alternatives(&mut group, &request);
    group.finish();
}

/// tower_governor's layer beside tollgate's, on the allowed path of the same request. Its
/// service only accepts a handler answering axum's `Body` (its own refusals are built from
/// it), so these rows have their own bare service answering that body, and tollgate's layer is
/// measured again over the same handler: compare each row with `no_limiter_axum_body`, not
/// with the rows above. Both limiters key on the peer address and can send two header fields
/// on an allowed response (tower_governor's `x-ratelimit-limit` and `x-ratelimit-remaining`
/// with `use_headers`; tollgate's `RateLimit-Policy` and `RateLimit`).
fn alternatives(group: &mut Group<'_>, request: &impl Fn() -> Request<()>) {
    use tower_governor::GovernorLayer;
    use tower_governor::governor::GovernorConfigBuilder;

    let handler = |_req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(
            Response::new(axum::body::Body::empty()),
        ))
    };
    let bare = ServiceBuilder::new().service_fn(handler);
    row(
        group,
        "no_limiter_axum_body",
        StatusCode::OK,
        &bare,
        request,
    );
    for (label, headers) in [
        ("allowed", tollgate::RateLimitHeaders::Ietf),
        ("allowed_no_headers", tollgate::RateLimitHeaders::None),
    ] {
        let svc = ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(MemoryStore::new())
                    .policy(Policy::new("api", tollgate_quota()))
                    .headers(headers),
            )
            .service_fn(handler);
        let name = format!("tollgate_{label}_axum_body");
        row(group, &name, StatusCode::OK, &svc, request);
    }
    // A million per second per address and the same burst as tollgate's quota here; without
    // and with its header fields (the two configurations are different types).
    let mut config = GovernorConfigBuilder::default();
    config.period(Duration::from_micros(1)).burst_size(BURST);
    let plain = ServiceBuilder::new()
        .layer(GovernorLayer::new(
            config.finish().expect("valid governor config"),
        ))
        .service_fn(handler);
    let name = "tower_governor_allowed_no_headers_axum_body";
    row(group, name, StatusCode::OK, &plain, request);
    let headers = config
        .use_headers()
        .finish()
        .expect("valid governor config");
    let with_headers = ServiceBuilder::new()
        .layer(GovernorLayer::new(headers))
        .service_fn(handler);
    let name = "tower_governor_allowed_axum_body";
    row(group, name, StatusCode::OK, &with_headers, request);
}

fn key_extraction(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let peer: IpAddr = "10.0.0.2".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-forwarded-for",
        "6.6.6.6, 198.51.100.7, 10.0.0.9".parse().unwrap(),
    );
    let direct = ClientIpSource::peer();
    let proxied = ClientIpSource::peer().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
    group.bench_function("peer", |b| {
        b.iter(|| black_box(direct.resolve(black_box(peer), &HeaderMap::new())));
    });
    group.bench_function("x_forwarded_for_trusted", |b| {
        b.iter(|| black_box(proxied.resolve(black_box(peer), &headers)));
    });
    // An attacker's 400 KB of `1,1,1,...` to the left of what the proxy appended: only the
    // rightmost hops matter, so the cost must not grow with what the client wrote.
    let mut huge = HeaderMap::new();
    let spoofed = "1,".repeat(200_000);
    huge.insert(
        "x-forwarded-for",
        format!("{spoofed}198.51.100.7").parse().unwrap(),
    );
    group.bench_function("x_forwarded_for_400kb_spoofed", |b| {
        b.iter(|| black_box(proxied.resolve(black_box(peer), &huge)));
    });
    let forwarded = ClientIpSource::peer()
        .trust_proxies(["10.0.0.0/8".parse().unwrap()])
        .header(tollgate::ForwardedHeader::Forwarded);
    let mut huge_fwd = HeaderMap::new();
    let spoofed = "for=1,".repeat(70_000);
    huge_fwd.insert(
        "forwarded",
        format!("{spoofed}for=198.51.100.7").parse().unwrap(),
    );
    group.bench_function("forwarded_400kb_spoofed", |b| {
        b.iter(|| black_box(forwarded.resolve(black_box(peer), &huge_fwd)));
    });
    let ip: IpAddr = "198.51.100.7".parse().unwrap();
    group.bench_function("key_display", |b| {
        b.iter(|| {
            black_box(
                Key::new("hello", "/hello", Some(ip), Some("user-42"))
                    .qualified()
                    .to_string(),
            )
        });
    });
    group.finish();
}

fn clock(c: &mut Criterion) {
    use tollgate::clock::{Clock, MonotonicClock};
    let mut group = c.benchmark_group("clock");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let monotonic = MonotonicClock::new();
    group.bench_function("monotonic_clock", |b| {
        b.iter(|| black_box(monotonic.now_ns()));
    });
    let origin = Instant::now();
    group.bench_function("std_instant", |b| {
        b.iter(|| black_box(origin.elapsed()));
    });
    group.finish();
}

criterion_group!(benches, check, layer, key_extraction, clock);
criterion_main!(benches);
