//! The quota stage: a request is admitted against its caller's limits before it is scheduled, and the
//! admission is settled exactly once afterwards: committed when an image was delivered, refunded
//! otherwise. The embedded default only counts requests in flight; the Redis store plugs in here.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::auth::Identity;
use crate::validation::ValidRequest;
use crate::GatewayError;

/// How a request ended, for settling its charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    NotDelivered,
}

/// A charge taken at admission; settled once.
#[derive(Debug)]
pub struct Ticket {
    pub request_id: String,
    pub user: String,
}

#[tonic::async_trait]
pub trait Admission: Send + Sync + 'static {
    async fn admit(
        &self,
        identity: &Identity,
        request: &ValidRequest,
    ) -> Result<Ticket, GatewayError>;
    /// Settles a ticket; consuming it makes a second settlement impossible.
    async fn settle(&self, ticket: Ticket, outcome: Outcome);
}

/// Admits everything and tracks requests in flight: the embedded default without quotas.
#[derive(Default)]
pub struct Unlimited {
    in_flight: AtomicI64,
}

impl Unlimited {
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

#[tonic::async_trait]
impl Admission for Unlimited {
    async fn admit(
        &self,
        identity: &Identity,
        request: &ValidRequest,
    ) -> Result<Ticket, GatewayError> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Ticket {
            request_id: request.request_id.clone(),
            user: identity.user.clone(),
        })
    }

    async fn settle(&self, _ticket: Ticket, _outcome: Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
