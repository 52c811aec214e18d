//! Generated tonic/prost code for Kiln's versioned protocol (`proto/kiln/v1`): the public image
//! service, the gateway-to-scheduler service and the scheduler-to-worker service. It owns nothing but
//! the wire types; every other crate converts them into its own typed values at its edge.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("kiln.v1");
}

/// The most previews one request may ask for (`GenerateRequest.partial_images`, checked by the
/// gateway, the scheduler and the worker).
pub const MAX_PARTIAL_IMAGES: u32 = 3;

/// The widest speculation window a request may name (`SamplingParams.speculation`, checked by the
/// gateway and the worker; the model crate's `MAX_SPECULATION`).
pub const MAX_SPECULATION: u32 = 64;

/// Metadata of every scheduler-to-worker call: the calling leader's fencing epoch (its etcd election
/// revision; 0 for a scheduler without an election). A worker refuses calls older than the newest
/// epoch it has seen.
pub const LEADER_EPOCH_HEADER: &str = "kiln-leader-epoch";

/// Encoded `FileDescriptorSet` of every Kiln proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");

/// The standard services every Kiln server carries besides its own: `grpc.health.v1` health checking
/// and server reflection over Kiln's descriptors, as `grpc.reflection.v1` and as the older
/// `grpc.reflection.v1alpha` that many stock tools still speak (grpcio-reflection's client among
/// them), so stock gRPC tools can talk to any port.
pub mod standard {
    use tonic_health::server::HealthReporter;

    /// The connections of a bound listener, with Nagle's algorithm off: streamed answers are
    /// small frames, and delayed ACKs would otherwise hold each one back by tens of milliseconds.
    pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
    }

    /// Health service, its reporter, and the reflection services (v1, v1alpha).
    pub fn services() -> (
        HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ) {
        let (reporter, health) = tonic_health::server::health_reporter();
        let builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        const VALID: &str = "the descriptor sets are generated at build time and valid";
        let v1 = builder().build_v1().expect(VALID);
        let v1alpha = builder().build_v1alpha().expect(VALID);
        (reporter, health, v1, v1alpha)
    }
}
