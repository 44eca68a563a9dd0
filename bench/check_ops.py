#!/usr/bin/env python3
"""Checks the chunked forms of the PyTorch references (torch_mixers_linear.py) against plain
token-by-token recurrences in f64: chunked SSD (Mamba-2), the gated delta rule (GDN, WY/UT
form) and WKV-7 (RWKV-7, chunkwise DPLR), with T = 13 not a multiple of the chunk (4).
Exits non-zero when any maximum difference exceeds 1e-10.
    bench/.venv/bin/python bench/check_ops.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
torch.set_default_dtype(torch.float64)
FAIL = []


def report(name, err):
    print(f"{name}: max |chunked - recurrent| = {err:.2e}")
    if not err < 1e-10:
        FAIL.append(name)


from torch_mixers_linear import ssd_chunked, gdr_chunked, rwkv7_chunked
torch.manual_seed(0)
B,T,H,P,G,N=2,13,4,3,2,5
x=torch.randn(B,T,H,P); dt=torch.rand(B,T,H)*0.5; A=-torch.rand(H)*3; Bm=torch.randn(B,T,G,N); Cm=torch.randn(B,T,G,N)
def ssd_ref():
    h=torch.zeros(B,H,P,N); ys=[]
    Bh=Bm.repeat_interleave(H//G,2); Ch=Cm.repeat_interleave(H//G,2)
    for t in range(T):
        h=torch.exp(dt[:,t]*A)[...,None,None]*h + dt[:,t][...,None,None]*x[:,t][...,None]*Bh[:,t][:,:,None,:]
        ys.append((h*Ch[:,t][:,:,None,:]).sum(-1))
    return torch.stack(ys,1)
report('ssd', (ssd_chunked(x,dt,A,Bm,Cm,4)-ssd_ref()).abs().max().item())
K,V=4,3
q=torch.randn(B,T,H,K); k=torch.nn.functional.normalize(torch.randn(B,T,H,K),dim=-1); v=torch.randn(B,T,H,V); g=-torch.rand(B,T,H); beta=torch.rand(B,T,H)
def gdr_ref():
    S=torch.zeros(B,H,K,V); os=[]
    for t in range(T):
        S=S*g[:,t].exp()[...,None,None]
        u=beta[:,t][...,None]*(v[:,t]-torch.einsum('bhkv,bhk->bhv',S,k[:,t]))
        S=S+k[:,t][...,None]*u[...,None,:]
        os.append(torch.einsum('bhkv,bhk->bhv',S,q[:,t]*K**-0.5))
    return torch.stack(os,1)
report('gdr', (gdr_chunked(q,k,v,g,beta,4)-gdr_ref()).abs().max().item())
r=torch.randn(B,T,H,K); w=torch.rand(B,T,H,K)*0.5+0.45; kk=torch.nn.functional.normalize(torch.randn(B,T,H,K),dim=-1); a=-kk; bb=kk*torch.rand(B,T,H,K); kx=torch.randn(B,T,H,K); vv=torch.randn(B,T,H,K)
def rw_ref():
    S=torch.zeros(B,H,K,K); os=[]
    for t in range(T):
        Sa=torch.einsum('bhvk,bhk->bhv',S,a[:,t])
        S=S*w[:,t][:,:,None,:]+Sa[...,None]*bb[:,t][:,:,None,:]+vv[:,t][...,None]*kx[:,t][:,:,None,:]
        os.append(torch.einsum('bhvk,bhk->bhv',S,r[:,t]))
    return torch.stack(os,1)
report('rwkv7', (rwkv7_chunked(r,w,kx,vv,a,bb,4)-rw_ref()).abs().max().item())

sys.exit(1 if FAIL else 0)
