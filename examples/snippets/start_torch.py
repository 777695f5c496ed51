import torch, torchvision, bnkit

model = torchvision.models.resnet18(weights=None, num_classes=10)
print(bnkit.inspect(model).summary())  # 20 BN layers: train 20
bnkit.freeze(model, train_from="layer4", bn="frozen")  # survives train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.SGD(params, lr=0.01)
model.train()
with bnkit.watch(model) as w:  # what moved, against the plan
    y = model(torch.randn(8, 3, 64, 64))
    torch.nn.functional.cross_entropy(y, torch.arange(8)).backward()
    opt.step()
assert w.report.ok, w.report  # as planned: 20/20 statistics kept, layer4 and fc moved
bnkit.export(model, "r18.pt2", input_shape=(3, 64, 64))  # folded, verified
