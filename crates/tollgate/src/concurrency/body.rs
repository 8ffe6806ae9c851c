use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// A response body that holds a concurrency slot until it has been streamed to its end, or
    /// dropped (a client that disconnects drops it).
    pub struct ConcurrencyBody<B, P> {
        #[pin]
        inner: B,
        permit: Option<Held<P>>,
    }
}

/// A slot held: the store's permit, and the request counted in flight while it is held.
#[derive(Debug)]
pub(crate) struct Held<P> {
    // Dropped in this order: the slot is given back, then the gauge goes down.
    _permit: P,
    _in_flight: crate::metrics::InFlight,
}

impl<P> Held<P> {
    pub(crate) fn new(permit: P, in_flight: crate::metrics::InFlight) -> Self {
        Held {
            _permit: permit,
            _in_flight: in_flight,
        }
    }
}

impl<B, P> ConcurrencyBody<B, P> {
    pub(crate) fn new(inner: B, permit: Option<Held<P>>) -> Self {
        ConcurrencyBody { inner, permit }
    }

    /// Whether the body still holds its slot.
    pub fn holds_slot(&self) -> bool {
        self.permit.is_some()
    }
}

impl<B: From<Bytes>, P> From<Bytes> for ConcurrencyBody<B, P> {
    fn from(bytes: Bytes) -> Self {
        ConcurrencyBody::new(B::from(bytes), None)
    }
}

impl<B: Body, P> Body for ConcurrencyBody<B, P> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match &frame {
            // The end, or an error that ends it: the request is finished.
            Poll::Ready(None | Some(Err(_))) => drop(this.permit.take()),
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug, P> fmt::Debug for ConcurrencyBody<B, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyBody")
            .field("inner", &self.inner)
            .field("holds_slot", &self.permit.is_some())
            .finish()
    }
}
