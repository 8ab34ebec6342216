"""The API as a new Python user meets it: stubs generated with grpcio-tools from proto/,
server reflection through grpcio-reflection (which speaks v1alpha only), and error details read
with grpcio-status.

    python client_conventions.py --proto-dir proto --orchestrator HOST:PORT \
        --participant stock=HOST:PORT [--participant ...] --product P

Exits 0 when every check holds; otherwise an AssertionError names the check. Run by
orchestrator/tests/python_client.rs (scripts/py-env makes the environment).
"""

import argparse
import importlib
import os
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from grpc_tools import protoc

PARTICIPANT_SERVICES = {
    "order": "saga.v1.OrderService",
    "stock": "saga.v1.StockService",
    "coupon": "saga.v1.CouponService",
    "balance": "saga.v1.BalanceService",
}
STANDARD = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def generate_stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="saga-py-stubs-")
    files = [
        os.path.join("saga", "v1", name)
        for name in ("common.proto", "orchestrator.proto", "participants.proto")
    ]
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}"]
        + files
    )
    assert code == 0, f"protoc failed with {code}"
    sys.path.insert(0, out)
    return (
        importlib.import_module("saga.v1.common_pb2"),
        importlib.import_module("saga.v1.orchestrator_pb2"),
        importlib.import_module("saga.v1.orchestrator_pb2_grpc"),
        importlib.import_module("saga.v1.participants_pb2"),
        importlib.import_module("saga.v1.participants_pb2_grpc"),
    )


def listed_services(channel):
    """ListServices over reflection v1alpha, as grpcio-reflection and older grpcurl ask."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    response = next(iter(responses))
    assert response.WhichOneof("message_response") == "list_services_response", response
    return {service.name for service in response.list_services_response.service}


def check_reflection(channel, own, label):
    listed = listed_services(channel)
    expected = set(own) | STANDARD
    assert listed == expected, f"{label}: reflection lists {sorted(listed)}, expected {sorted(expected)}"
    # The descriptor database grpcio-reflection offers resolves each of our services.
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    for name in own:
        service = pool.FindServiceByName(name)
        assert service.methods, f"{label}: {name} has no methods through reflection"
    print(f"ok reflection v1alpha on {label}: {sorted(listed)}")


def details_of(error):
    status = rpc_status.from_call(error)
    assert status is not None, f"no grpc-status-details-bin in {error.code()} {error.details()}"
    return status


def check_bad_request(orch_pb2, orch_grpc, channel):
    stub = orch_grpc.OrchestratorStub(channel)
    request = orch_pb2.StartOrderRequest(
        request_id="py-invalid-1",
        user_id="u1",
        items=[{"product_id": "p1", "quantity": 0}],
        amount_minor=10,
    )
    try:
        stub.StartOrder(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        status = details_of(error)
        assert len(status.details) == 1, status
        assert status.details[0].Is(error_details_pb2.BadRequest.DESCRIPTOR), status.details[0].type_url
        bad_request = error_details_pb2.BadRequest()
        status.details[0].Unpack(bad_request)
        fields = [v.field for v in bad_request.field_violations]
        assert fields == ["items[0].quantity"], fields
        print(f"ok INVALID_ARGUMENT carries a BadRequest naming {fields[0]}")
        return
    raise AssertionError("StartOrder with quantity 0 was accepted")


def check_refusal(common_pb2, part_pb2, part_grpc, channel, product):
    stub = part_grpc.StockServiceStub(channel)
    request = part_pb2.ReserveStockRequest(
        key=common_pb2.StepKey(saga_id="py-refusal-1", step="reserve_stock"),
        order_id="py-refusal-1",
        items=[common_pb2.OrderItem(product_id=product, quantity=10**12)],
    )
    try:
        stub.ReserveStock(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        status = details_of(error)
        info = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        assert len(info) == 1, [d.type_url for d in status.details]
        error_info = error_details_pb2.ErrorInfo()
        info[0].Unpack(error_info)
        assert error_info.reason == "OUT_OF_STOCK", error_info
        assert error_info.domain == "saga.v1", error_info
        assert product in error_info.metadata["detail"], error_info
        typed = [d for d in status.details if d.Is(common_pb2.BusinessRefusal.DESCRIPTOR)]
        assert len(typed) == 1, [d.type_url for d in status.details]
        refusal = common_pb2.BusinessRefusal()
        typed[0].Unpack(refusal)
        assert refusal.reason == common_pb2.REFUSAL_REASON_OUT_OF_STOCK, refusal
        print("ok FAILED_PRECONDITION carries an ErrorInfo (OUT_OF_STOCK) and a BusinessRefusal")
        return
    raise AssertionError("a reservation of 10^12 units was accepted")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--orchestrator", required=True)
    parser.add_argument("--participant", action="append", default=[], help="ROLE=HOST:PORT")
    parser.add_argument("--product", required=True, help="a seeded product id")
    args = parser.parse_args()
    common_pb2, orch_pb2, orch_grpc, part_pb2, part_grpc = generate_stubs(args.proto_dir)

    with grpc.insecure_channel(args.orchestrator) as channel:
        check_reflection(channel, ["saga.v1.Orchestrator"], "orchestrator")
        check_bad_request(orch_pb2, orch_grpc, channel)
    participants = dict(p.split("=", 1) for p in args.participant)
    for role, addr in participants.items():
        with grpc.insecure_channel(addr) as channel:
            check_reflection(channel, [PARTICIPANT_SERVICES[role], "saga.v1.ConsumerAdmin", "saga.v1.StepCalls"], role)
    with grpc.insecure_channel(participants["stock"]) as channel:
        check_refusal(common_pb2, part_pb2, part_grpc, channel, args.product)
    print("all checks passed")


if __name__ == "__main__":
    main()
