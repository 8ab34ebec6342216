//! `saga.v1.ConsumerAdmin`: the compensation consumer's parked messages, listed and requeued.

use saga_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::service::invalid;

/// `saga.v1.ConsumerAdmin`: the compensation consumer's parked messages.
#[derive(Clone)]
pub struct ConsumerAdminService {
    pub(crate) consumer: Option<std::sync::Arc<crate::consumer::CompensationConsumer>>,
    /// Every ConsumerAdmin call is an admin call (`saga_proto::auth`).
    pub(crate) admin: saga_proto::auth::AdminToken,
}

impl ConsumerAdminService {
    fn consumer(&self) -> Result<&crate::consumer::CompensationConsumer, Status> {
        self.consumer
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("no compensation consumer runs in this process"))
    }
}

/// Most parked messages per page.
const PARKED_PAGE_MAX: u32 = 1000;

#[tonic::async_trait]
impl pb::consumer_admin_server::ConsumerAdmin for ConsumerAdminService {
    async fn list_parked(
        &self,
        request: Request<pb::ListParkedRequest>,
    ) -> Result<Response<pb::ListParkedResponse>, Status> {
        self.admin.check(request.metadata())?;
        let r = request.into_inner();
        let page_size = match r.page_size {
            0 => 100,
            n if n > PARKED_PAGE_MAX => return Err(invalid("page_size", &format!("1..={PARKED_PAGE_MAX}"))),
            n => n,
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let parked = self
            .consumer()?
            .parked(after, page_size as usize)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let next_page_token = if parked.len() == page_size as usize {
            parked.last().map(|p| p.log_key.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListParkedResponse {
            parked,
            next_page_token,
        }))
    }

    async fn requeue_parked(
        &self,
        request: Request<pb::RequeueParkedRequest>,
    ) -> Result<Response<pb::RequeueParkedResponse>, Status> {
        self.admin.check(request.metadata())?;
        let log_key = request.into_inner().log_key;
        if log_key.is_empty() || log_key.len() > 512 {
            return Err(invalid("log_key", "1..=512 bytes"));
        }
        match self
            .consumer()?
            .requeue(&log_key)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
        {
            Some(message) => Ok(Response::new(pb::RequeueParkedResponse {
                message: Some(message),
            })),
            None => Err(Status::not_found(format!("no parked message {log_key}"))),
        }
    }
}
