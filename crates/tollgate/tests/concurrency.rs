//! The concurrency limit: slots held until the response body ends or is dropped, given back
//! when the client disconnects or the handler panics, composed with the rate limiter.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tollgate::concurrency::{ConcurrencyLimitLayer, ConcurrencyPolicy, MemoryConcurrencyStore};
use tollgate::{Key, MemoryStore, Policy, Quota, RateLimitLayer};
use tower::{Service, ServiceBuilder, ServiceExt};

mod support;

const PEER: ([u8; 4], u16) = ([192, 0, 2, 1], 1);

fn request() -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut().insert(SocketAddr::from(PEER));
    req
}

fn key() -> Key<'static> {
    Key::new("report", "report", Some(IpAddr::from(PEER.0)), None::<&str>)
}

/// A body whose chunks the test sends one by one.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// An inner service whose every response streams until the test ends or drops it: the test
/// receives the chunk sender of each response's body.
fn streaming() -> (
    impl tower::Service<Request<()>, Response = Response<ChannelBody>, Error = Infallible, Future: Send>
    + Clone,
    mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
) {
    let (senders_tx, senders_rx) = mpsc::unbounded_channel();
    let service = tower::service_fn(move |_req: Request<()>| {
        let (chunks, body) = mpsc::unbounded_channel();
        let _ = senders_tx.send(chunks);
        async move { Ok::<_, Infallible>(Response::new(ChannelBody(body))) }
    });
    (service, senders_rx)
}

impl From<Bytes> for ChannelBody {
    fn from(b: Bytes) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(b);
        ChannelBody(rx)
    }
}

#[tokio::test]
async fn a_streaming_body_holds_its_slot_until_it_ends() {
    let store = MemoryConcurrencyStore::new();
    // The handler hands the test the sender of each response body.
    let (streaming, mut senders_rx) = streaming();
    let svc = ServiceBuilder::new()
        .layer(
            ConcurrencyLimitLayer::new(store.clone()).policy(ConcurrencyPolicy::new("report", 1)),
        )
        .service(streaming);

    let first = svc.clone().oneshot(request()).await.unwrap();
    let chunks = senders_rx.recv().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    // The handler has returned, but the body is still streaming: the slot is held.
    assert_eq!(store.in_flight(&key()), 1);
    let second = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.headers()["retry-after"], "1");

    let mut body = first.into_body();
    chunks.send(Bytes::from_static(b"part 1")).unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "part 1");
    assert_eq!(store.in_flight(&key()), 1);
    assert!(body.holds_slot());
    // The end of the stream gives the slot back, before the body is even dropped.
    drop(chunks);
    assert!(body.frame().await.is_none());
    assert!(!body.holds_slot());
    assert_eq!(store.in_flight(&key()), 0);
    drop(body);

    // A body dropped half-way gives it back too.
    let third = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(third.status(), StatusCode::OK);
    let _chunks = senders_rx.recv().await.unwrap();
    assert_eq!(store.in_flight(&key()), 1);
    drop(third);
    assert_eq!(store.in_flight(&key()), 0);
}

#[tokio::test]
async fn a_panicking_handler_gives_its_slot_back() {
    let store = MemoryConcurrencyStore::new();
    let handler_store = store.clone();
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let svc = ServiceBuilder::new()
        .layer(
            ConcurrencyLimitLayer::new(store.clone()).policy(ConcurrencyPolicy::new("report", 1)),
        )
        .service_fn(move |_req: Request<()>| {
            let store = handler_store.clone();
            let held_tx = held_tx.clone();
            async move {
                // The handler runs holding the slot...
                held_tx.send(store.in_flight(&key())).unwrap();
                tokio::task::yield_now().await;
                panic!("handler bug");
                #[allow(unreachable_code)]
                Ok::<_, Infallible>(Response::new(http_body_util::Full::<Bytes>::default()))
            }
        });
    let task = tokio::spawn(svc.clone().oneshot(request()));
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(
        held_rx.recv().await,
        Some(1),
        "no slot was held while the handler ran"
    );
    // ...and the panic gives it back.
    assert_eq!(store.in_flight(&key()), 0);
}

#[tokio::test]
async fn a_disconnecting_client_gives_its_slot_back() {
    let store = MemoryConcurrencyStore::new();
    let app = Router::new()
        .route(
            "/slow",
            get(|| async {
                // Longer than the client waits; bounded so the test always ends.
                tokio::time::sleep(Duration::from_secs(20)).await;
                "late"
            }),
        )
        .layer(
            ConcurrencyLimitLayer::new(store.clone())
                .route("/slow", ConcurrencyPolicy::new("slow", 1)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let key = Key::new(
        "slow",
        "/slow",
        Some(IpAddr::from([127, 0, 0, 1])),
        None::<&str>,
    );
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{addr}/slow");
    // The request is in the handler, holding the slot...
    let impatient = tokio::spawn(client.get(&url).send());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.in_flight(&key) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never held a slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...when the client gives up: its connection closes mid-request.
    impatient.abort();
    assert!(impatient.await.unwrap_err().is_cancelled());
    // The server notices the closed connection and drops the request, slot included.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.in_flight(&key) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.abort();
}

#[tokio::test]
async fn composes_with_the_rate_limiter_on_the_same_route() {
    let conc = MemoryConcurrencyStore::new();
    let (streaming, mut senders_rx) = streaming();
    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .policy(Policy::new("report", "3/h".parse::<Quota>().unwrap())),
        )
        .layer(ConcurrencyLimitLayer::new(conc.clone()).policy(ConcurrencyPolicy::new("report", 1)))
        .service(streaming);
    let first = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().contains_key("ratelimit"));
    let chunks = senders_rx.recv().await.unwrap();
    // Refused by the concurrency limit while the first streams (it spends rate budget, as any
    // request that reached the concurrency layer).
    let second = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(chunks);
    drop(first);
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(request())
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // Then the rate limit: 3 per hour.
    let fourth = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(fourth.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(fourth.headers().contains_key("ratelimit"));
}

#[tokio::test]
async fn requests_without_a_peer_address_are_handled_like_the_rate_limiter_does() {
    use tollgate::{FailureMode, MissingKey};
    let store = MemoryConcurrencyStore::new();
    let (senders_tx, mut senders_rx) = mpsc::unbounded_channel();
    let layer = |missing: Option<MissingKey>, failure: FailureMode| {
        let l = ConcurrencyLimitLayer::new(store.clone())
            .policy(ConcurrencyPolicy::new("report", 1).with_failure_mode(failure));
        match missing {
            Some(m) => l.missing_key(m),
            None => l,
        }
    };
    let handler = move |_req: Request<()>| {
        let (chunks, body) = mpsc::unbounded_channel::<Bytes>();
        let _ = senders_tx.send(chunks);
        async move { Ok::<_, Infallible>(Response::new(ChannelBody(body))) }
    };

    // The default: every unaddressed request shares one key, so the limit still holds.
    let svc = ServiceBuilder::new()
        .layer(layer(None, FailureMode::Open))
        .service_fn(handler.clone());
    let first = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let _open_body = senders_rx.recv().await.unwrap();
    let unaddressed = Key::new("report", "report", None, None::<&str>);
    assert_eq!(store.in_flight(&unaddressed), 1);
    let second = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(first);
    assert_eq!(store.in_flight(&unaddressed), 0);

    // Allow: through on a fail-open policy, holding no slot; 503 on a fail-closed one.
    let svc = ServiceBuilder::new()
        .layer(layer(Some(MissingKey::Allow), FailureMode::Open))
        .service_fn(handler.clone());
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!res.body().holds_slot());
    let svc = ServiceBuilder::new()
        .layer(layer(Some(MissingKey::Allow), FailureMode::Closed))
        .service_fn(handler.clone());
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));

    // Reject: 500.
    let svc = ServiceBuilder::new()
        .layer(layer(Some(MissingKey::Reject), FailureMode::Open))
        .service_fn(handler);
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

/// A concurrency policy and a rate policy of the same name on one route count in their own
/// series: merged, the dashboard would show each request twice and the two limits as one.
#[tokio::test]
async fn a_concurrency_policy_counts_apart_from_a_rate_policy_of_the_same_name() {
    use metrics_util::debugging::DebuggingRecorder;
    use tollgate::metrics::{CONCURRENCY_REQUESTS_TOTAL, REQUESTS_TOTAL};
    let recorder = DebuggingRecorder::new();
    let counters = support::Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (streaming, mut senders_rx) = streaming();
    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .policy(Policy::new("report", "2/h".parse::<Quota>().unwrap())),
        )
        .layer(
            ConcurrencyLimitLayer::new(MemoryConcurrencyStore::new())
                .policy(ConcurrencyPolicy::new("report", 1)),
        )
        .service(streaming);
    // One streams; the second is refused by the concurrency limit; the third by the rate limit.
    let first = svc.ready().await.unwrap().call(request()).await.unwrap();
    let _chunks = senders_rx.recv().await.unwrap();
    let second = svc.ready().await.unwrap().call(request()).await.unwrap();
    let third = svc.ready().await.unwrap().call(request()).await.unwrap();
    let statuses = [first.status(), second.status(), third.status()];
    assert_eq!(
        statuses,
        [200, 429, 429].map(|s| StatusCode::from_u16(s).unwrap())
    );
    let count = |name: &str, decision: &str| {
        counters
            .get(name, &[("policy", "report"), ("decision", decision)])
            .unwrap_or(0)
    };
    assert_eq!(
        (
            count(REQUESTS_TOTAL, "allowed"),
            count(REQUESTS_TOTAL, "limited")
        ),
        (2, 1),
        "the rate limiter's series"
    );
    assert_eq!(
        (
            count(CONCURRENCY_REQUESTS_TOTAL, "allowed"),
            count(CONCURRENCY_REQUESTS_TOTAL, "limited")
        ),
        (1, 1),
        "the concurrency limiter's series"
    );
}

/// The in-flight gauge counts requests while they hold a slot: from the moment the slot is
/// taken until the body ends or is dropped, never a refused request, and back to zero after.
#[tokio::test]
async fn the_in_flight_gauge_follows_the_slots_held() {
    use metrics_util::debugging::DebuggingRecorder;
    use tollgate::metrics::CONCURRENCY_IN_FLIGHT;
    let recorder = DebuggingRecorder::new();
    let counters = support::Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (streaming, mut senders_rx) = streaming();
    let mut svc = ServiceBuilder::new()
        .layer(
            ConcurrencyLimitLayer::new(MemoryConcurrencyStore::new())
                .policy(ConcurrencyPolicy::new("export", 2)),
        )
        .service(streaming);
    let in_flight = || counters.gauge(CONCURRENCY_IN_FLIGHT, &[("policy", "export")]);
    assert_eq!(in_flight(), Some(0.0), "registered at zero");

    let first = svc.ready().await.unwrap().call(request()).await.unwrap();
    let first_chunks = senders_rx.recv().await.unwrap();
    let second = svc.ready().await.unwrap().call(request()).await.unwrap();
    let second_chunks = senders_rx.recv().await.unwrap();
    assert_eq!(in_flight(), Some(2.0));
    let refused = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(in_flight(), Some(2.0), "a refused request holds no slot");

    // A client that disconnects drops its body: one fewer.
    drop(first);
    drop(first_chunks);
    assert_eq!(in_flight(), Some(1.0));
    // A body streamed to its end: none.
    drop(second_chunks);
    let body = second.into_body().collect().await;
    assert!(body.is_ok());
    assert_eq!(in_flight(), Some(0.0));
}
