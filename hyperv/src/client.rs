//! WS-Management operations over one authenticated connection: Identify, Get,
//! Enumerate/Pull to the end, Invoke, and waiting on the `Msvm_ConcreteJob` an
//! asynchronous method starts.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::transport::Transport;
use crate::wsman::{self, Envelope, Epr, Filter, Header, Instance, Param, ReplyError};
use crate::xml::Node;

/// The WMI namespace of Hyper-V's v2 classes.
pub const V2: &str = "root/virtualization/v2";
/// Items asked for per Enumerate/Pull answer.
const MAX_ELEMENTS: u32 = 100;
/// An enumeration longer than this is refused (a host with 100 000 VMs does not exist;
/// a server that never ends its sequence does).
const MAX_ITEMS: usize = 200_000;
/// WinRM's default `MaxEnvelopeSizekb` is 500 KiB.
const MAX_ENVELOPE: u32 = 512_000;

/// A WS-Management client of one host.
#[derive(Debug)]
pub struct Client {
    transport: Transport,
    /// Singleton services (`Msvm_ImageManagementService`…) by class, found once.
    pub(crate) services: std::sync::Mutex<std::collections::HashMap<String, Epr>>,
    /// How long a WMI job may run before we give up on it.
    pub job_timeout: Duration,
    /// How often a running job is polled.
    pub job_poll: Duration,
}

/// A method's result once its job (if any) has ended.
#[derive(Debug, Clone)]
pub struct Completed {
    /// The method's out parameters.
    pub output: Instance,
    /// The job it started, if it answered 4096.
    pub job: Option<Epr>,
}

impl Client {
    /// A client over `transport`.
    pub fn new(transport: Transport) -> Client {
        Client {
            transport,
            services: std::sync::Mutex::default(),
            job_timeout: Duration::from_secs(30 * 60),
            job_poll: Duration::from_millis(500),
        }
    }

    /// The endpoint URL.
    pub fn url(&self) -> &str {
        self.transport.url()
    }

    /// The user name the client authenticates as.
    pub fn user(&self) -> &str {
        self.transport.user()
    }

    async fn call(&self, envelope: Envelope, operation: &str) -> Result<Node> {
        let (status, body) = self.transport.post(operation, envelope.xml).await?;
        match wsman::body(&body) {
            Ok(node) if status == 200 => Ok(node),
            Ok(_) => Err(Error::Status {
                operation: operation.to_owned(),
                status,
                body: snippet(&body),
            }),
            Err(ReplyError::Fault(fault)) => Err(Error::Fault {
                operation: operation.to_owned(),
                fault: Box::new(fault),
            }),
            Err(ReplyError::Malformed(detail)) if status == 200 => Err(Error::Reply {
                operation: operation.to_owned(),
                detail,
            }),
            Err(ReplyError::Malformed(_)) => Err(Error::Status {
                operation: operation.to_owned(),
                status,
                body: snippet(&body),
            }),
        }
    }

    fn header<'a>(&'a self, message_id: &'a str) -> Header<'a> {
        Header {
            to: self.transport.url(),
            message_id,
            max_envelope_size: MAX_ENVELOPE,
            timeout_secs: 60,
        }
    }

    /// `Identify`: (vendor, product version), e.g. `OS: 10.0.17763 SP: 0.0 Stack: 3.0`.
    pub async fn identify(&self) -> Result<(String, String)> {
        let operation = format!("Identify at {}", self.url());
        let body = self.call(wsman::identify(), &operation).await?;
        wsman::identity(&body).map_err(|detail| Error::Reply { operation, detail })
    }

    /// `Get` of one instance.
    pub async fn get(&self, target: &Epr) -> Result<Instance> {
        let id = wsman::message_id();
        let operation = format!("Get {} {:?}", target.class(), target.selectors);
        let body = self
            .call(wsman::get(&self.header(&id), target), &operation)
            .await?;
        wsman::instance(&body).map_err(|detail| Error::Reply { operation, detail })
    }

    /// Every instance `filter` selects under `resource_uri`, pulling to the end.
    pub async fn enumerate(&self, resource_uri: &str, filter: &Filter) -> Result<Vec<Instance>> {
        let what = match filter {
            Filter::All => resource_uri.to_owned(),
            Filter::Wql(query) => query.clone(),
            Filter::Associated {
                object,
                association,
                result_class,
            } => format!(
                "{result_class} associated to {} {:?} by {association}",
                object.class(),
                object.selectors
            ),
        };
        let operation = format!("Enumerate {what}");
        let id = wsman::message_id();
        let body = self
            .call(
                wsman::enumerate(&self.header(&id), resource_uri, filter, MAX_ELEMENTS),
                &operation,
            )
            .await?;
        let mut page = wsman::page(&body).map_err(|detail| Error::Reply {
            operation: operation.clone(),
            detail,
        })?;
        let mut items = std::mem::take(&mut page.items);
        while !page.end {
            let Some(context) = page.context.take() else {
                break;
            };
            if items.len() > MAX_ITEMS {
                return Err(Error::Reply {
                    operation,
                    detail: format!("more than {MAX_ITEMS} items and no end in sight"),
                });
            }
            let id = wsman::message_id();
            let body = self
                .call(
                    wsman::pull(&self.header(&id), resource_uri, &context, MAX_ELEMENTS),
                    &operation,
                )
                .await?;
            page = wsman::page(&body).map_err(|detail| Error::Reply {
                operation: operation.clone(),
                detail,
            })?;
            items.append(&mut page.items);
        }
        Ok(items)
    }

    /// A WQL query in `namespace`.
    pub async fn wql(&self, namespace: &str, query: &str) -> Result<Vec<Instance>> {
        self.enumerate(
            &wsman::class_uri(namespace, "*"),
            &Filter::Wql(query.to_owned()),
        )
        .await
    }

    /// The `result_class` instances associated to `object` through `association`.
    pub async fn associated(
        &self,
        object: &Epr,
        association: &str,
        result_class: &str,
    ) -> Result<Vec<Instance>> {
        self.enumerate(
            wsman::ALL_CIM_CLASSES,
            &Filter::Associated {
                object: object.clone(),
                association: association.to_owned(),
                result_class: result_class.to_owned(),
            },
        )
        .await
    }

    /// Invokes `method` and returns its out parameters (whatever `ReturnValue` says).
    pub async fn invoke(
        &self,
        target: &Epr,
        method: &str,
        params: &[(&str, Param)],
        operation: &str,
    ) -> Result<Instance> {
        let id = wsman::message_id();
        let body = self
            .call(
                wsman::invoke(&self.header(&id), target, method, params),
                operation,
            )
            .await?;
        wsman::output(&body, method).map_err(|detail| Error::Reply {
            operation: operation.to_owned(),
            detail,
        })
    }

    /// Invokes `method`; on 4096 waits for its job to complete. Any other code than 0 or
    /// 4096, or a job that does not complete, is an error naming `operation`.
    pub async fn invoke_and_wait(
        &self,
        target: &Epr,
        method: &str,
        params: &[(&str, Param)],
        operation: &str,
    ) -> Result<Completed> {
        let output = self.invoke(target, method, params, operation).await?;
        let code = output
            .u64("ReturnValue")
            .map_err(|detail| Error::Reply {
                operation: operation.to_owned(),
                detail,
            })?
            .ok_or_else(|| Error::Reply {
                operation: operation.to_owned(),
                detail: format!("{method} answered without a ReturnValue"),
            })?;
        match code {
            0 => Ok(Completed { output, job: None }),
            4096 => {
                let job = output
                    .reference("Job")
                    .cloned()
                    .ok_or_else(|| Error::Reply {
                        operation: operation.to_owned(),
                        detail: format!("{method} answered 4096 (job started) without a Job"),
                    })?;
                self.wait_job(&job, operation).await?;
                Ok(Completed {
                    output,
                    job: Some(job),
                })
            }
            code => Err(Error::Method {
                operation: operation.to_owned(),
                method: method.to_owned(),
                code,
            }),
        }
    }

    /// Polls a `Msvm_ConcreteJob` until it completes; a failed, killed or timed-out job
    /// is an error with the job's own description.
    pub async fn wait_job(&self, job: &Epr, operation: &str) -> Result<Instance> {
        let started = Instant::now();
        let job_id = job.selector("InstanceID").unwrap_or("?").to_owned();
        loop {
            let state = self.get(job).await?;
            let job_state = state.u64("JobState").map_err(|detail| Error::Reply {
                operation: operation.to_owned(),
                detail,
            })?;
            match job_state {
                Some(7) => return Ok(state),
                // New, Starting, Running, Suspended, Shutting Down, Service.
                Some(2..=6) | Some(11) | None => {}
                Some(other) => {
                    let description = state
                        .text("ErrorDescription")
                        .or(state.text("ErrorSummaryDescription"))
                        .unwrap_or("no description")
                        .trim()
                        .to_owned();
                    return Err(Error::Job {
                        operation: operation.to_owned(),
                        job: job_id,
                        state: other,
                        code: state.u64("ErrorCode").ok().flatten().unwrap_or(0),
                        description,
                    });
                }
            }
            if started.elapsed() > self.job_timeout {
                return Err(Error::JobTimeout {
                    operation: operation.to_owned(),
                    job: job_id,
                    seconds: self.job_timeout.as_secs(),
                    percent: state.u64("PercentComplete").ok().flatten().unwrap_or(0),
                });
            }
            tokio::time::sleep(self.job_poll).await;
        }
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.trim().to_owned()
}
